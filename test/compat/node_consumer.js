#!/usr/bin/env node
// Runs the Node consumer library `aws-kinesis-agg` (pinned in test/support/package.json) for the
// Rust test ext/kinesis_core/tests/consumer_compat.rs. Same protocol as py_consumer.py:
//
// stdin: {"jobs": [job, ...]}; stdout: {"library", "version", "results": [...]}, one per job.
//   {"op": "deaggregate", "records": [{"partition_key", "data", "sequence_number"}]}
//       Each Kinesis record goes through deaggregateSync(record, computeChecksums = true).
//       result: [{"error", "user_records": [{"partition_key", "explicit_hash_key", "data",
//                                            "sub_sequence_number", "aggregated"}]}]  (per record)
//   {"op": "aggregate", "records": [{"partition_key", "explicit_hash_key" (or null), "data"}]}
//       The records go through the library's aggregate() in order.
//       result: {"aggregates": [{"partition_key", "explicit_hash_key", "data"}]}
//
// Binary data travels as base64. Exit status 3 with a message on stderr when the library is
// not installed.
'use strict'
const path = require('path')

const INSTALL = 'npm ci --prefix test/support'
const LIBRARY_DIR = path.join(__dirname, '..', 'support', 'node_modules', 'aws-kinesis-agg')

let agg
let version
try {
  agg = require(LIBRARY_DIR)
  version = require(path.join(LIBRARY_DIR, 'package.json')).version
} catch (e) {
  process.stderr.write(`aws-kinesis-agg cannot be loaded from ${LIBRARY_DIR} (${e.message}): run \`${INSTALL}\`\n`)
  process.exit(3)
}

function deaggregate (records) {
  return records.map((r) => {
    const kinesisRecord = {
      kinesisSchemaVersion: '1.0',
      partitionKey: r.partition_key,
      sequenceNumber: r.sequence_number,
      data: r.data,
      approximateArrivalTimestamp: 1700000000.123
    }
    const errors = []
    let userRecords = []
    // The callback runs synchronously: once per failing user record, then once at the end.
    agg.deaggregateSync(kinesisRecord, true, (err, records) => {
      if (err) errors.push(err.message)
      if (records) userRecords = records
    })
    return {
      error: errors.length ? errors.join('; ') : null,
      user_records: userRecords.map((u) => ({
        partition_key: u.partitionKey,
        // The library's name for the explicit hash key; undefined when the table lookup misses.
        explicit_hash_key: u.explicitPartitionKey === undefined ? null : u.explicitPartitionKey,
        data: u.data,
        sub_sequence_number: u.subSequenceNumber === undefined ? null : u.subSequenceNumber,
        // A passed-through record is the only kind without a sub-sequence number.
        aggregated: u.subSequenceNumber !== undefined
      }))
    }
  })
}

function aggregate (records) {
  const input = records.map((r) => {
    const rec = { partitionKey: r.partition_key, data: Buffer.from(r.data, 'base64') }
    if (r.explicit_hash_key !== null && r.explicit_hash_key !== undefined) rec.explicitHashKey = r.explicit_hash_key
    return rec
  })
  return new Promise((resolve, reject) => {
    const aggregates = []
    agg.aggregate(
      input,
      (encoded, done) => {
        aggregates.push({
          partition_key: encoded.partitionKey,
          explicit_hash_key: encoded.ExplicitHashKey === undefined ? null : encoded.ExplicitHashKey,
          data: encoded.data.toString('base64')
        })
        done(null, {})
      },
      () => resolve({ aggregates }),
      (err) => reject(err),
      1
    )
  })
}

async function main () {
  const chunks = []
  for await (const chunk of process.stdin) chunks.push(chunk)
  const request = JSON.parse(Buffer.concat(chunks).toString('utf8'))
  const results = []
  for (const job of request.jobs) {
    if (job.op === 'deaggregate') results.push(deaggregate(job.records))
    else if (job.op === 'aggregate') results.push(await aggregate(job.records))
    else throw new Error(`unknown op ${job.op}`)
  }
  process.stdout.write(JSON.stringify({ library: 'aws-kinesis-agg', version, results }))
}

main().catch((e) => {
  process.stderr.write(`${e.stack || e}\n`)
  process.exit(1)
})
