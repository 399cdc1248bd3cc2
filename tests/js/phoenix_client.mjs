// Drives the OFFICIAL phoenix npm client (Socket, Channel, Presence) for tests/test_phoenix_official_client.py.
//
// Line protocol: one JSON command per stdin line, one JSON event per stdout line. Commands:
//   {"cmd": "connect", "client", "url", "params"?, "authToken"?}
//   {"cmd": "join", "client", "topic", "resume"?: true}   resume: rejoin with {since: last seq seen}
//   {"cmd": "push", "client", "topic", "event", "payload"?, "tag"?}
//   {"cmd": "leave", "client", "topic"}
//   {"cmd": "disconnect", "client"}
// Events: {"client", "type": open|close|join_ok|join_error|channel_error|reply|sync|message, ...}
// where "message" carries every channel event the app binds (current_state, notification,
// reverse_flow_update, reset) with its payload.
//
// Node 20 has no global WebSocket: the `ws` package is passed as the transport.
import readline from "node:readline"
import {Presence, Socket} from "phoenix"
import WebSocket from "ws"

const sockets = new Map() // client -> Socket
const channels = new Map() // `${client} ${topic}` -> Channel
const lastSeq = new Map() // `${client} ${topic}` -> last notification seq seen

function emit(event) {
  process.stdout.write(JSON.stringify(event) + "\n")
}

function connect({client, url, params, authToken}) {
  const socket = new Socket(url, {
    transport: WebSocket,
    params: params || {},
    authToken,
    // quicker than the defaults (10 ms .. 5 s, 1 s .. 10 s) so a restart test takes seconds
    reconnectAfterMs: () => 100,
    rejoinAfterMs: () => 200,
  })
  socket.onOpen(() => emit({client, type: "open"}))
  socket.onClose((event) => emit({client, type: "close", code: event && event.code}))
  socket.connect()
  sockets.set(client, socket)
}

function join({client, topic, resume}) {
  const key = `${client} ${topic}`
  const params = () => (resume && lastSeq.has(key) ? {since: lastSeq.get(key)} : {})
  const channel = sockets.get(client).channel(topic, params)
  for (const event of ["current_state", "reverse_flow_update", "reset"]) {
    channel.on(event, (payload) => emit({client, topic, type: "message", event, payload}))
  }
  channel.on("notification", (payload) => {
    lastSeq.set(key, payload.seq)
    emit({client, topic, type: "message", event: "notification", payload})
  })
  channel.onError((reason) => emit({client, topic, type: "channel_error", reason}))
  const presence = new Presence(channel)
  presence.onSync(() => {
    const keys = presence.list((id, {metas}) => ({key: id, usernames: metas.map((m) => m.username)}))
    emit({client, topic, type: "sync", presences: keys})
  })
  channel
    .join()
    .receive("ok", (response) => emit({client, topic, type: "join_ok", response}))
    .receive("error", (response) => emit({client, topic, type: "join_error", response}))
    .receive("timeout", () => emit({client, topic, type: "join_timeout"}))
  channels.set(key, channel)
}

function push({client, topic, event, payload, tag}) {
  channels
    .get(`${client} ${topic}`)
    .push(event, payload || {})
    .receive("ok", (response) => emit({client, topic, type: "reply", tag, status: "ok", response}))
    .receive("error", (response) => emit({client, topic, type: "reply", tag, status: "error", response}))
    .receive("timeout", () => emit({client, topic, type: "reply", tag, status: "timeout"}))
}

function leave({client, topic}) {
  const key = `${client} ${topic}`
  channels
    .get(key)
    .leave()
    .receive("ok", () => emit({client, topic, type: "left"}))
  channels.delete(key)
}

const commands = {connect, join, push, leave, disconnect: ({client}) => sockets.get(client).disconnect()}

readline.createInterface({input: process.stdin}).on("line", (line) => {
  const command = JSON.parse(line)
  try {
    commands[command.cmd](command)
  } catch (error) {
    emit({type: "driver_error", command, message: String(error)})
  }
}).on("close", () => process.exit(0))

emit({type: "ready"})
