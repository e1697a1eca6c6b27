"""A Django app with wsbroadcast mounted on its WSGI application (one file, no database).

    .venv/bin/pip install '.[redis]' django gunicorn
    WSBROADCAST_REDIS=redis://127.0.0.1:6379/0 .venv/bin/gunicorn --chdir examples \\
        --worker-class gthread --workers 4 --threads 100 --bind 127.0.0.1:8000 django_app:application

then open http://127.0.0.1:8000/. The page loads the browser client (``/wsbroadcast.js``,
from the package), connects to ``/live`` and subscribes to ``news``; the form POSTs to
``/say``, an ordinary Django view (CSRF-checked) that calls ``broker.publish()``. Every
open page shows every post, whichever worker served the post and whichever the page.

``Broker.mount`` puts the WebSocket endpoint in front of Django's WSGI application:
requests for ``/live`` go to the broker, everything else to Django. Each gunicorn worker
has its own broker; with ``$WSBROADCAST_REDIS`` they share seqs, history and fan-out
through Redis (without it, run one worker). The ``gthread`` worker is needed: each
WebSocket keeps its request thread, so ``--threads`` bounds the connections per worker.
"""

from __future__ import annotations

import atexit
import html
import logging
import os

from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False,
        # set DJANGO_SECRET_KEY in production; CSRF here needs no secret (the token is in a cookie)
        SECRET_KEY=os.environ.get("DJANGO_SECRET_KEY", "wsbroadcast-example-not-secret"),
        ALLOWED_HOSTS=os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(","),
        ROOT_URLCONF=__name__,
        MIDDLEWARE=["django.middleware.security.SecurityMiddleware",
                    "django.middleware.common.CommonMiddleware",
                    "django.middleware.csrf.CsrfViewMiddleware"],
        INSTALLED_APPS=[],
        USE_TZ=True,
    )

import django  # noqa: E402

django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse, JsonResponse  # noqa: E402
from django.middleware.csrf import get_token  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.http import require_GET, require_POST  # noqa: E402

from wsbroadcast.http import static_file  # noqa: E402
from wsbroadcast.wsgi import Broker  # noqa: E402

TOPIC = "news"

#: the Flask example's page, with the CSRF field in its form
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "news_page.html"), encoding="utf-8") as _f:
    PAGE = _f.read()

# the broker's log lines (ready, Redis lost and back, slow consumers), with the worker's pid
logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
#: this worker's broker; its clients get 1001 when the worker exits
broker = Broker(store="memory", redis_url=os.environ.get("WSBROADCAST_REDIS") or None).start()
broker.shutdown_on_signal()  # gunicorn stops a worker with SIGTERM: 1001 to its clients at once
atexit.register(broker.shutdown)  # and the shutdown is over before the worker exits


@require_GET
def index(request: HttpRequest) -> HttpResponse:
    field = '<input type="hidden" name="csrfmiddlewaretoken" value="%s">' % html.escape(get_token(request))
    return HttpResponse(PAGE.replace("<!--form-fields-->", field, 1))


@require_GET
def client_script(request: HttpRequest) -> HttpResponse:
    return HttpResponse(static_file("/wsbroadcast.js"), content_type="text/javascript")


@require_POST
def say(request: HttpRequest) -> HttpResponse:
    """Publish the posted text on ``news``: its seq as JSON, or back to the page."""
    text = request.POST.get("text", "").strip()
    if not text:
        return JsonResponse({"error": "empty"}, status=400)
    seq, _epoch = broker.publish(TOPIC, text)
    if "application/json" in request.headers.get("Accept", ""):
        return JsonResponse({"topic": TOPIC, "seq": seq})
    return HttpResponse(status=303, headers={"Location": "/"})  # a plain form post without JavaScript


urlpatterns = [
    path("", index),
    path("wsbroadcast.js", client_script),
    path("say", say),
]

#: the WSGI application: the WebSocket endpoint at /live, every other path to Django
application = broker.mount(get_wsgi_application(), path="/live")
