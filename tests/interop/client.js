#!/usr/bin/env node
'use strict'

// One-shot Grenache RPC client for the p2pex <-> Grenache interop test.
//
//   node client.js --grape http://127.0.0.1:PORT --service NAME --mode request|map \
//     [--compress gzip|none] [--timeout MS] 'JSON_PAYLOAD'
//
// Looks the service up through the grape (grenache-nodejs-link), sends the
// payload once with PeerRPCClient (grenache-nodejs-http) and prints exactly one
// line of JSON on stdout:
//   {"ok":true,"result":<result>}          (map mode: result is an array)
//   {"ok":false,"error":"<error message>"}
// Exit code is 0 in both cases; 1 only for usage errors or a crash.
//
// Compression: grenache-nodejs-http's PeerRPCClient forwards `opts.compress`
// to its transport. When truthy, the request body is gzipped and sent with the
// header `grc-compress: gzip`, and the reply body is gunzipped unconditionally
// (the reply's own headers are not looked at). Without it the header is
// `grc-compress: none` and nothing is (de)compressed.

const { parseArgs } = require('util')
const Link = require('grenache-nodejs-link')
const { PeerRPCClient } = require('grenache-nodejs-http')

const USAGE = 'usage: node client.js --grape http://127.0.0.1:PORT --service NAME ' +
  '--mode request|map [--compress gzip|none] [--timeout MS] \'JSON_PAYLOAD\''

function usage (msg) {
  if (msg) process.stderr.write(`client.js: ${msg}\n`)
  process.stderr.write(USAGE + '\n')
  process.exit(1)
}

function parse () {
  let parsed
  try {
    parsed = parseArgs({
      allowPositionals: true,
      options: {
        grape: { type: 'string' },
        service: { type: 'string' },
        mode: { type: 'string', default: 'request' },
        compress: { type: 'string', default: 'none' },
        timeout: { type: 'string', default: '10000' },
        help: { type: 'boolean', short: 'h' }
      }
    })
  } catch (e) {
    usage(e.message)
  }
  const { values, positionals } = parsed
  if (values.help) {
    process.stdout.write(USAGE + '\n')
    process.exit(0)
  }
  if (!values.grape) usage('--grape is required')
  if (!values.service) usage('--service is required')
  if (!['request', 'map'].includes(values.mode)) usage('--mode must be request or map')
  if (!['gzip', 'none'].includes(values.compress)) usage('--compress must be gzip or none')
  const timeout = Number(values.timeout)
  if (!Number.isInteger(timeout) || timeout <= 0) usage('--timeout must be a positive integer (ms)')
  if (positionals.length !== 1) usage('exactly one JSON_PAYLOAD argument is required')
  let payload
  try {
    payload = JSON.parse(positionals[0])
  } catch (e) {
    usage(`JSON_PAYLOAD is not valid JSON: ${e.message}`)
  }
  return {
    grape: values.grape.replace(/\/+$/, ''),
    service: values.service,
    mode: values.mode,
    compress: values.compress === 'gzip',
    timeout,
    payload
  }
}

function main () {
  const args = parse()

  const link = new Link({ grape: args.grape })
  link.start()

  const peer = new PeerRPCClient(link, {})
  peer.init()

  let done = false
  let watchdog = null

  const finish = (out) => {
    if (done) return
    done = true
    clearTimeout(watchdog)
    try { peer.stop() } catch (e) {}
    try { link.stop() } catch (e) {}
    process.stdout.write(JSON.stringify(out) + '\n', () => {
      // Everything is stopped; this only matters if some socket lingers.
      setTimeout(() => process.exit(0), 500).unref()
    })
  }

  const cb = (err, result) => {
    if (err) {
      finish({ ok: false, error: String(err && err.message !== undefined ? err.message : err) })
    } else {
      finish({ ok: true, result: result === undefined ? null : result })
    }
  }

  // Safety net: the lookup goes through the link (requestTimeout 2500 ms,
  // 3 tries) and the RPC has its own HTTP timeout, so this should not fire;
  // it keeps the process from hanging if a reply with an unknown rid arrives.
  watchdog = setTimeout(() => cb(new Error('ERR_CLIENT_WATCHDOG')), args.timeout + 15000)

  const opts = { timeout: args.timeout, compress: args.compress }

  try {
    if (args.mode === 'map') {
      peer.map(args.service, args.payload, opts, cb)
    } else {
      peer.request(args.service, args.payload, opts, cb)
    }
  } catch (e) {
    cb(e)
  }
}

try {
  main()
} catch (e) {
  process.stderr.write(`client.js: crash: ${e && e.stack ? e.stack : e}\n`)
  process.exit(1)
}
