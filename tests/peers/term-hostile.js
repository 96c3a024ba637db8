// Feeds gateway/web/term.js (the web console's terminal renderer) what a hostile device or a
// crafted recording could send, in Node with a minimal stand-in for the DOM, and prints one
// line: "ok MS COLSxROWS" when every sequence was taken in bounded time and memory.
// Usage: node term-hostile.js PATH/TO/term.js
'use strict';
const fs = require('fs');
const node = () => ({
  replaceChildren() {}, append() {}, addEventListener() {}, remove() {},
  getBoundingClientRect() { return { width: 80, height: 16 }; },
  clientWidth: 800, clientHeight: 400, textContent: '',
});
global.document = { createElement: node };
global.window = {};
global.requestAnimationFrame = () => 0;
eval(fs.readFileSync(process.argv[2], 'utf8'));
const Term = global.window.EdgeportTerm;
const t = new Term(node());
const enc = new TextEncoder();
const start = Date.now();
const big = '999999999';
for (const f of ['S', 'T', 'L', 'M', '@', 'P', 'X', 'A', 'B', 'C', 'D', 'H', 'r']) {
  t.write(enc.encode(`\x1b[${big}${f}hello`));
}
// Parameters without end, then a final byte.
t.write(enc.encode('\x1b[' + '9;'.repeat(1 << 20) + 'm'));
if (t.params.length > 64) { console.log(`params grew to ${t.params.length}`); process.exit(1); }
// A recording's header may name any size.
t.resize(1e9, 1e9);
const [cols, rows] = [t.cols, t.rows];
if (cols > 500 || rows > 300 || t.screen.length !== rows || t.screen.some((l) => l.length !== cols)) {
  console.log(`bad screen ${cols}x${rows}`); process.exit(1);
}
t.resize(NaN, -5);
t.write(enc.encode('still fine\r\n'));
console.log(`ok ${Date.now() - start} ${cols}x${rows}`);
