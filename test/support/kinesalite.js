#!/usr/bin/env node
// Starts kinesalite on 127.0.0.1 only (its CLI listens on every interface) and prints one JSON
// line {"port": N, "pid": P} once it accepts connections. Port 0 (the default) picks a free one.
// Stops on SIGTERM/SIGINT.
'use strict'
const path = require('path')
const kinesalite = require(path.join(__dirname, 'node_modules', 'kinesalite'))

const port = Number(process.env.KINESALITE_PORT || process.argv[2] || 0)
const server = kinesalite({ createStreamMs: 0, deleteStreamMs: 0, updateStreamMs: 0, shardLimit: 1000 })
server.listen(port, '127.0.0.1', () => {
  process.stdout.write(JSON.stringify({ port: server.address().port, pid: process.pid }) + '\n')
})
const stop = () => server.close(() => process.exit(0))
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
// Exit with the parent: a test harness that dies must not leave a server behind.
process.stdin.on('end', stop)
process.stdin.resume()
