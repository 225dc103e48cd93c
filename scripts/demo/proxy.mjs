// A TCP proxy for the demo: listens on a fixed local address and forwards each connection to a
// ready pod of a Service, found in its EndpointSlices (the local cluster has no kube-proxy, and
// the pod's local address is only known once it runs). Only Node.js built-ins.
//
//   node scripts/demo/proxy.mjs --listen 127.0.0.1:8080 --kubectl PATH --namespace NS --service NAME
import { execFile } from "node:child_process";
import net from "node:net";
import { parseArgs, promisify } from "node:util";

const run = promisify(execFile);
const { values } = parseArgs({
  options: {
    listen: { type: "string" },
    kubectl: { type: "string", default: "kubectl" },
    namespace: { type: "string" },
    service: { type: "string" },
    port: { type: "string", default: "http" },
  },
});
const [host, port] = values.listen.split(/:(?=\d+$)/);

let cached = { at: 0, targets: [] };
async function targets() {
  if (Date.now() - cached.at < 2000 && cached.targets.length > 0) return cached.targets;
  const { stdout } = await run(values.kubectl, [
    "-n", values.namespace, "get", "endpointslices",
    "-l", `kubernetes.io/service-name=${values.service}`, "-o", "json",
  ]);
  const found = [];
  for (const slice of JSON.parse(stdout).items ?? []) {
    const p = (slice.ports ?? []).find((p) => p.name === values.port);
    if (!p) continue;
    for (const endpoint of slice.endpoints ?? []) {
      if (endpoint.conditions?.ready === false || endpoint.conditions?.terminating) continue;
      for (const address of endpoint.addresses ?? []) found.push({ host: address, port: p.port });
    }
  }
  // Always the same pod while it stays ready: browser sessions live in one API process.
  found.sort((a, b) => (a.host < b.host ? -1 : a.host > b.host ? 1 : 0));
  cached = { at: Date.now(), targets: found };
  return found;
}

const server = net.createServer(async (client) => {
  client.on("error", () => {});
  let list;
  try {
    list = await targets();
  } catch (error) {
    list = [];
  }
  if (list.length === 0) {
    client.end("HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nno ready API pod yet\n");
    return;
  }
  const target = list[0];
  const upstream = net.connect(target.port, target.host);
  upstream.on("error", () => client.destroy());
  client.pipe(upstream);
  upstream.pipe(client);
});
server.listen(Number(port), host, () => console.log(`proxy listening on ${values.listen} for service ${values.namespace}/${values.service}`));
for (const signal of ["SIGINT", "SIGTERM"]) process.on(signal, () => process.exit(0));
