// Validate an AsyncAPI document with the official parser (@asyncapi/parser, installed by `make node`).
// Usage: node tools/cli/asyncapi/validate.mjs [docs/api/asyncapi.yaml]
// Prints every diagnostic; exits 1 when any is an error, 2 when the file cannot be read.
import { readFile } from "node:fs/promises";
import { resolve } from "node:path";
import { Parser, DiagnosticSeverity } from "@asyncapi/parser";

const SEVERITY = { 0: "error", 1: "warning", 2: "info", 3: "hint" };

const path = resolve(process.argv[2] ?? "docs/api/asyncapi.yaml");
let source;
try {
  source = await readFile(path, "utf8");
} catch (err) {
  console.error(`cannot read ${path}: ${err.message}`);
  process.exit(2);
}

const { document, diagnostics } = await new Parser().parse(source, { source: path });
for (const d of diagnostics) {
  const where = d.path && d.path.length ? d.path.join(".") : "(document)";
  const line = d.range ? `:${d.range.start.line + 1}` : "";
  console.log(`${SEVERITY[d.severity] ?? d.severity} ${d.code} at ${where}${line}: ${d.message}`);
}
const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
if (errors.length || document === undefined) {
  console.error(`${path}: ${errors.length} error(s), not a valid AsyncAPI document`);
  process.exit(1);
}
console.log(`${path}: valid AsyncAPI ${document.version()} (${diagnostics.length - errors.length} warning(s) or hint(s))`);
