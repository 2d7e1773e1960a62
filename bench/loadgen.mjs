// The api scenario's load generator: GETs of one URL at a fixed rate with `loadtest` (npm), open
// model (a request leaves every 1/rate s whether or not earlier ones have answered; a new keep-alive
// connection opens when none is free), so a slow server shows as latency, not as a lower rate.
// Usage: node bench/loadgen.mjs '{"url": …, "rate": 1000, "seconds": 20, "warmupS": 3, "headers": {…}}'
// Prints one JSON object: statuses, connection errors, and a histogram of latencies in whole ms.
import { loadTest } from 'loadtest'

const spec = JSON.parse(process.argv[2])

async function drive(seconds, record) {
  return loadTest({
    url: spec.url,
    requestsPerSecond: spec.rate,
    maxSeconds: seconds,
    agentKeepAlive: true,
    headers: spec.headers ?? {},
    quiet: true,
    statusCallback: record,
  })
}

if (spec.warmupS > 0) {
  await drive(spec.warmupS, () => {})
}
const statuses = {}
const latencyMs = {}
let connectionErrors = 0
const cpu0 = process.cpuUsage()
const result = await drive(spec.seconds, (error, res) => {
  if (!res) {
    connectionErrors += 1
    return
  }
  statuses[res.statusCode] = (statuses[res.statusCode] ?? 0) + 1
  latencyMs[res.requestElapsed] = (latencyMs[res.requestElapsed] ?? 0) + 1
})
const cpu = process.cpuUsage(cpu0)
console.log(
  JSON.stringify({
    requestedRate: spec.rate,
    elapsedS: result.elapsedSeconds,
    statuses,
    connectionErrors,
    latencyMs,
    connections: result.clients,
    cpuS: (cpu.user + cpu.system) / 1e6,
  }),
)
