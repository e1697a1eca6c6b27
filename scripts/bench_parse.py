#!/usr/bin/env python3
"""Cost of reading client JSON: envelope.parse_json (depth and finite-number checks) against
the plain C decoder it wraps, on ordinary frames and on the worst 1 MiB inputs for each check.

    python scripts/bench_parse.py [--quick]

Each figure is the best of several runs (the machine may be shared), per call.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wsbroadcast import envelope  # noqa: E402


def _reject(name: str) -> None:
    raise ValueError(name)


#: what parse_json was before the checks: the C decoder refusing only NaN/Infinity literals
plain = json.JSONDecoder(parse_constant=_reject).decode
MIB = 1 << 20

ORDINARY = {
    "ping": '{"type":"ping","id":7}',
    "publish, small object": '{"type":"publish","topic":"chat.room1","id":17,'
                             '"data":{"user":"alice","text":"hello there, how are you?"}}',
    "publish, 20 floats": json.dumps({"type": "publish", "topic": "sensors.t1", "id": 3,
                                      "data": [i * 1.5 + 0.25 for i in range(20)]}),
    "publish, 20 ints": json.dumps({"type": "publish", "topic": "sensors.t1", "id": 3, "data": list(range(20))}),
    "publish, 100 objects (6 KiB)": json.dumps({"type": "publish", "topic": "a.b", "data": [
        {"name": "item%d" % i, "v": i, "tags": ["x", "y"]} for i in range(100)]}),
}
WORST = {
    # the depth check's longest path: 63 deep, then empty pairs (64 levels in all)
    "1 MiB: depth 63 then [] pairs": "[" * 63 + "[]," * (MIB // 3 - 64) + "[]" + "]" * 63,
    "1 MiB: depth 64, 9 deep many times": "[" * 55 + ",".join(["[" * 9 + "]" * 9] * (MIB // 19)) + "]" * 55,
    # string stripping: brackets inside strings
    "1 MiB: strings full of [": "[" + ",".join(['"' + "[" * 100 + '"'] * (MIB // 103)) + "]",
    # the digit-run scan, and integers through the checking decoder; floats without and with exponents
    "1 MiB: integers of 308 digits": "[" + ",".join(["1" * 308] * (MIB // 309)) + "]",
    "1 MiB: small integers": json.dumps(list(range(150000)))[:MIB].rsplit(",", 1)[0] + "]",
    "1 MiB: floats": json.dumps([i * 1.5 + 0.25 for i in range(80000)]),
    "1 MiB: floats with exponents": json.dumps([i * 1.5e-300 for i in range(40000)]),
}


def _strict(text: str) -> None:
    try:
        envelope.parse_json(text)
    except ValueError:
        pass


def best(fn, number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs")
    args = ap.parse_args()
    repeat = 3 if args.quick else 9
    print("python %s; per call, best of %d runs" % (sys.version.split()[0], repeat))
    print("%-34s %12s %12s %8s" % ("input", "plain C", "strict", "ratio"))
    for name, text in list(ORDINARY.items()) + list(WORST.items()):
        n = 20000 if len(text) < 10000 else 5
        try:
            plain(text)
        except ValueError:
            pass
        a = best(lambda: plain(text), n, repeat)
        b = best(lambda: _strict(text), n, repeat)
        unit, scale = ("us", 1e6) if a < 1e-3 else ("ms", 1e3)
        print("%-34s %9.2f %s %9.2f %s %7.2fx" % (name, a * scale, unit, b * scale, unit, b / a))
    deep = "[" * MIB
    print("%-34s %12s %9.2f us  (refused before decoding)" % ("1 MiB of [", "-", best(
        lambda: _strict(deep), 20, repeat) * 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
