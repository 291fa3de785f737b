// Validate an AsyncAPI document with the official parser; print its diagnostics as JSON.
// Usage: node validate_asyncapi.mjs <document> (NODE_PATH: where @asyncapi/parser lives).
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";

const require = createRequire(join(process.env.ASYNCAPI_PARSER_DIR, "package.json"));
const { Parser } = require("@asyncapi/parser");

const text = readFileSync(process.argv[2], "utf8");
const { document, diagnostics } = await new Parser().parse(text);
const out = diagnostics.map((d) => ({
  severity: d.severity,
  code: d.code,
  message: d.message,
  path: d.path.join("."),
}));
console.log(JSON.stringify({ parsed: document !== undefined, diagnostics: out }));
