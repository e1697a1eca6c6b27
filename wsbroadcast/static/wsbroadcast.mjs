/*! wsbroadcast.mjs: wsbroadcast.js as an ES module (import { connect } from "/wsbroadcast.mjs"). */
import "./wsbroadcast.js";

const wsbroadcast = globalThis.wsbroadcast;
export default wsbroadcast;
export const { connect, Client, SUBPROTOCOL, VERSION, DEFAULTS, backoffDelay, isPattern, matches,
               WsbroadcastError } = wsbroadcast;
