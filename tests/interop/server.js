#!/usr/bin/env node
'use strict'

// Grenache RPC echo server for the p2pex <-> Grenache interop test.
//
//   node server.js --grape http://127.0.0.1:PORT --service NAME --port PORT [--bind 127.0.0.1]
//
// Listens with PeerRPCServer (grenache-nodejs-http), announces NAME on the
// grape every second, and answers every request with
//   {"echo": <payload>, "server": "node"}
// Prints the single line `listening` on stdout after the first announce the
// grape accepted. Stops cleanly on SIGTERM / SIGINT (exit 0).
//
// Note: the grape answers an announce with HTTP 200 even when it failed, with
// the error message as a JSON string body (e.g. "No nodes to query" while its
// DHT knows no other node). grenache-nodejs-link passes that string on as a
// *result*, so a successful announce is recognised here by a numeric result
// (the number of DHT nodes that accepted it).

const http = require('http')
const { parseArgs } = require('util')
const Link = require('grenache-nodejs-link')
const { PeerRPCServer } = require('grenache-nodejs-http')

const USAGE = 'usage: node server.js --grape http://127.0.0.1:PORT --service NAME --port PORT [--bind 127.0.0.1]'

function usage (msg) {
  if (msg) process.stderr.write(`server.js: ${msg}\n`)
  process.stderr.write(USAGE + '\n')
  process.exit(1)
}

let values
try {
  values = parseArgs({
    options: {
      grape: { type: 'string' },
      service: { type: 'string' },
      port: { type: 'string' },
      bind: { type: 'string', default: '127.0.0.1' },
      help: { type: 'boolean', short: 'h' }
    }
  }).values
} catch (e) {
  usage(e.message)
}
if (values.help) {
  process.stdout.write(USAGE + '\n')
  process.exit(0)
}
if (!values.grape) usage('--grape is required')
if (!values.service) usage('--service is required')
const port = Number(values.port)
if (!Number.isInteger(port) || port <= 0 || port > 65535) usage('--port must be a TCP port')

const link = new Link({ grape: values.grape.replace(/\/+$/, '') })
link.start()

const peer = new PeerRPCServer(link, { timeout: 300000 })
peer.init()

const service = peer.transport('server')

// TransportRPCServer.listen(port) calls http.Server#listen(port) without a
// host (all interfaces). Keep the test on loopback: hand it a server whose
// listen() adds the bind address.
service.getSocket = () => {
  const srv = http.createServer()
  const listen = srv.listen.bind(srv)
  srv.listen = (p, ...rest) => listen(p, values.bind, ...rest)
  return srv
}

service.on('request', (rid, key, payload, handler) => {
  handler.reply(null, { echo: payload, server: 'node' })
})

service.listen(port)
service.socket.on('error', (err) => {
  process.stderr.write(`server.js: listen error: ${err.message}\n`)
  process.exit(1)
})

let announcedOnce = false
const announce = () => {
  link.announce(values.service, port, {}, (err, res) => {
    if (err || typeof res !== 'number') {
      process.stderr.write(`server.js: announce failed: ${err ? err.message : JSON.stringify(res)}\n`)
      return
    }
    if (!announcedOnce) {
      announcedOnce = true
      process.stdout.write('listening\n')
    }
  })
}
announce()
const itv = setInterval(announce, 1000)

let stopping = false
const stop = () => {
  if (stopping) return
  stopping = true
  clearInterval(itv)
  try { link.stop() } catch (e) {}
  try { service.stop() } catch (e) {}
  try { peer.stop() } catch (e) {}
  // http.Server#close waits for open keep-alive connections; do not.
  setImmediate(() => process.exit(0))
}
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
