// A small terminal for the web console: the VT100/xterm subset a shell prompt, ls, top
// and less need (cursor moves, erase, scroll region, insert/delete), drawn into a <pre>.
// SGR: the 16 colours (foreground and background, 256-colour codes below 16 too), bold and
// inverse; a cell with attributes is its character followed by one marker code point
// (plane 16, U+100000 + attributes), drawn as a <span> with classes (app.css). Written for
// Edgeport (Apache-2.0), no dependencies.
'use strict';

const MARK = 0x100000;

// The classes of a cell's attributes (see Term.sgr).
function classes(a) {
  const fg = a & 31; const bg = (a >> 5) & 31;
  return [fg ? `f${fg - 1}` : '', bg ? `b${bg - 1}` : '', a & 1024 ? 'bold' : '', a & 2048 ? 'inv' : '']
    .filter(Boolean).join(' ');
}

class Term {
  constructor(pre, onInput) {
    this.pre = pre;
    this.onInput = onInput || (() => {});
    this.decoder = new TextDecoder('utf-8');
    this.cols = 80; this.rows = 24;
    this.scrollback = [];
    this.reset();
    this.pending = false;
    pre.tabIndex = 0;
    pre.addEventListener('keydown', (e) => this.key(e));
    pre.addEventListener('paste', (e) => {
      e.preventDefault();
      const t = (e.clipboardData || window.clipboardData).getData('text');
      if (t) this.onInput(t.replace(/\r?\n/g, '\r'));
    });
  }

  reset() {
    this.screen = [];
    for (let i = 0; i < this.rows; i++) this.screen.push(this.blank());
    this.x = 0; this.y = 0; this.top = 0; this.bottom = this.rows - 1;
    this.state = 0; this.params = ''; this.saved = [0, 0]; this.attr = 0;
  }

  blank() { return new Array(this.cols).fill(' '); }

  // The size that fits the element, in characters.
  fit() {
    const probe = document.createElement('span');
    probe.textContent = 'MMMMMMMMMM';
    this.pre.append(probe);
    const cw = probe.getBoundingClientRect().width / 10 || 8;
    const ch = probe.getBoundingClientRect().height || 16;
    probe.remove();
    const cols = Math.max(20, Math.floor((this.pre.clientWidth - 8) / cw));
    const rows = Math.max(5, Math.floor((this.pre.clientHeight - 8) / ch));
    this.resize(cols, rows);
    return [this.cols, this.rows];
  }

  resize(cols, rows) {
    if (cols === this.cols && rows === this.rows) return;
    const fix = (line) => line.slice(0, cols).concat(new Array(Math.max(0, cols - line.length)).fill(' '));
    this.cols = cols;
    this.screen = this.screen.map(fix);
    while (this.screen.length > rows) {
      if (this.y > 0) { this.scrollback.push(this.screen.shift()); this.y--; } else this.screen.pop();
    }
    while (this.screen.length < rows) this.screen.push(this.blank());
    this.rows = rows; this.top = 0; this.bottom = rows - 1;
    this.x = Math.min(this.x, cols - 1); this.y = Math.min(this.y, rows - 1);
    this.draw();
  }

  write(data) {
    const s = typeof data === 'string' ? data : this.decoder.decode(data, { stream: true });
    for (const c of s) this.put(c);
    this.draw();
  }

  scroll(up) {
    const line = this.blank();
    if (up) {
      const gone = this.screen.splice(this.top, 1)[0];
      if (this.top === 0) { this.scrollback.push(gone); if (this.scrollback.length > 1000) this.scrollback.shift(); }
      this.screen.splice(this.bottom, 0, line);
    } else {
      this.screen.splice(this.bottom, 1);
      this.screen.splice(this.top, 0, line);
    }
  }

  lf() { if (this.y === this.bottom) this.scroll(true); else if (this.y < this.rows - 1) this.y++; }

  put(c) {
    if (this.state === 1) { // after ESC
      if (c === '[') { this.state = 2; this.params = ''; return; }
      if (c === ']') { this.state = 3; return; }
      if (c === '(' || c === ')') { this.state = 4; return; }
      if (c === '7') this.saved = [this.x, this.y];
      else if (c === '8') [this.x, this.y] = this.saved;
      else if (c === 'M') { if (this.y === this.top) this.scroll(false); else if (this.y > 0) this.y--; }
      else if (c === 'D') this.lf();
      else if (c === 'c') this.reset();
      this.state = 0; return;
    }
    if (this.state === 2) { // CSI
      if (c >= '@' && c <= '~') { this.state = 0; this.csi(c, this.params); } else this.params += c;
      return;
    }
    if (this.state === 3) { // OSC, up to BEL or ESC \
      if (c === '\x07') this.state = 0; else if (c === '\x1b') this.state = 1;
      return;
    }
    if (this.state === 4) { this.state = 0; return; } // charset designation
    switch (c) {
      case '\x1b': this.state = 1; return;
      case '\r': this.x = 0; return;
      case '\n': case '\x0b': case '\x0c': this.lf(); return;
      case '\b': if (this.x > 0) this.x--; return;
      case '\t': this.x = Math.min(this.cols - 1, (Math.floor(this.x / 8) + 1) * 8); return;
      case '\x07': case '\x00': return;
    }
    if (c < ' ') return;
    if (this.x >= this.cols) { this.x = 0; this.lf(); }
    this.screen[this.y][this.x++] = this.attr ? c + String.fromCodePoint(MARK + this.attr) : c;
  }

  // SGR: attributes are fg (0 default, 1-16 colour 0-15) | bg << 5 | bold << 10 | inverse << 11.
  sgr(n) {
    let fg = this.attr & 31; let bg = (this.attr >> 5) & 31;
    let bold = (this.attr >> 10) & 1; let inv = (this.attr >> 11) & 1;
    for (let i = 0; i < n.length; i++) {
      const v = Number.isNaN(n[i]) ? 0 : n[i];
      if (v === 0) { fg = 0; bg = 0; bold = 0; inv = 0; }
      else if (v === 1) bold = 1;
      else if (v === 22) bold = 0;
      else if (v === 7) inv = 1;
      else if (v === 27) inv = 0;
      else if (v >= 30 && v <= 37) fg = v - 29;
      else if (v === 39) fg = 0;
      else if (v >= 40 && v <= 47) bg = v - 39;
      else if (v === 49) bg = 0;
      else if (v >= 90 && v <= 97) fg = v - 81;
      else if (v >= 100 && v <= 107) bg = v - 91;
      else if (v === 38 || v === 48) { // 5;N (the first 16 only) or 2;R;G;B (not shown)
        if (n[i + 1] === 5) {
          const c = n[i + 2];
          if (c >= 0 && c < 16) { if (v === 38) fg = c + 1; else bg = c + 1; }
          i += 2;
        } else if (n[i + 1] === 2) i += 4;
      }
    }
    this.attr = fg | (bg << 5) | (bold << 10) | (inv << 11);
  }

  csi(f, p) {
    const priv = p.startsWith('?');
    const n = (priv ? p.slice(1) : p).split(';').map((v) => parseInt(v, 10));
    const a = (i, d) => (Number.isNaN(n[i]) || n[i] === undefined || n[i] === 0 ? d : n[i]);
    const row = this.screen[this.y];
    const clamp = () => { this.x = Math.max(0, Math.min(this.cols - 1, this.x)); this.y = Math.max(0, Math.min(this.rows - 1, this.y)); };
    switch (f) {
      case 'A': this.y -= a(0, 1); break;
      case 'B': case 'e': this.y += a(0, 1); break;
      case 'C': case 'a': this.x += a(0, 1); break;
      case 'D': this.x -= a(0, 1); break;
      case 'E': this.y += a(0, 1); this.x = 0; break;
      case 'F': this.y -= a(0, 1); this.x = 0; break;
      case 'G': case '`': this.x = a(0, 1) - 1; break;
      case 'd': this.y = a(0, 1) - 1; break;
      case 'H': case 'f': this.y = a(0, 1) - 1; this.x = a(1, 1) - 1; break;
      case 'J': {
        const m = n[0] || 0;
        if (m === 0) { row.fill(' ', this.x); for (let i = this.y + 1; i < this.rows; i++) this.screen[i] = this.blank(); }
        else if (m === 1) { row.fill(' ', 0, this.x + 1); for (let i = 0; i < this.y; i++) this.screen[i] = this.blank(); }
        else for (let i = 0; i < this.rows; i++) this.screen[i] = this.blank();
        break;
      }
      case 'K': {
        const m = n[0] || 0;
        if (m === 0) row.fill(' ', this.x); else if (m === 1) row.fill(' ', 0, this.x + 1); else row.fill(' ');
        break;
      }
      case 'X': row.fill(' ', this.x, this.x + a(0, 1)); break;
      case 'P': row.splice(this.x, a(0, 1)); while (row.length < this.cols) row.push(' '); break;
      case '@': row.splice(this.x, 0, ...new Array(a(0, 1)).fill(' ')); row.length = this.cols; break;
      case 'L': for (let i = 0; i < a(0, 1); i++) { this.screen.splice(this.bottom, 1); this.screen.splice(this.y, 0, this.blank()); } break;
      case 'M': for (let i = 0; i < a(0, 1); i++) { this.screen.splice(this.y, 1); this.screen.splice(this.bottom, 0, this.blank()); } break;
      case 'S': for (let i = 0; i < a(0, 1); i++) this.scroll(true); break;
      case 'T': for (let i = 0; i < a(0, 1); i++) this.scroll(false); break;
      case 'r': this.top = a(0, 1) - 1; this.bottom = Math.min(this.rows, a(1, this.rows)) - 1; this.x = 0; this.y = 0; break;
      case 's': this.saved = [this.x, this.y]; break;
      case 'u': [this.x, this.y] = this.saved; break;
      case 'h': case 'l': if (priv && (n[0] === 1049 || n[0] === 47)) { for (let i = 0; i < this.rows; i++) this.screen[i] = this.blank(); } break;
      case 'm': if (!priv && !p.startsWith('>')) this.sgr(n); break;
      default: break; // n, t, ...: ignored
    }
    clamp();
  }

  draw() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      // Runs of cells with the same attributes become one text node or <span>.
      // A fragment, not replaceChildren(...nodes): a long scrollback makes ~10^5 nodes,
      // more arguments than a call may take.
      const out = document.createDocumentFragment();
      let run = ''; let cls = '';
      const flush = () => {
        if (!run) return;
        if (cls) { const s = document.createElement('span'); s.className = cls; s.textContent = run; out.append(s); } else out.append(run);
        run = '';
      };
      const add = (text, c) => { if (c !== cls) { flush(); cls = c; } run += text; };
      const line = (cells, cursorAt) => {
        let end = cells.length;
        while (end > 0 && cells[end - 1] === ' ') end--;
        if (cursorAt !== undefined) end = Math.max(end, cursorAt + 1);
        for (let i = 0; i < end; i++) {
          const cell = cells[i] || ' ';
          const cp = cell.codePointAt(cell.length - 2);
          const a = cell.length > 1 && cp >= MARK ? cp - MARK : 0;
          const glyph = a ? cell.slice(0, -2) : cell;
          if (i === cursorAt) {
            flush(); cls = '';
            const cur = document.createElement('span');
            cur.className = 'cursor'; cur.textContent = glyph;
            out.append(cur);
          } else add(glyph, a ? classes(a) : '');
        }
      };
      let last = this.rows - 1;
      while (last > this.y && this.screen[last].every((c) => c === ' ')) last--;
      const all = this.scrollback.concat(this.screen.slice(0, last + 1));
      const cursorRow = this.scrollback.length + this.y;
      all.forEach((cells, i) => {
        if (i > 0) add('\n', '');
        line(cells, i === cursorRow ? this.x : undefined);
      });
      flush();
      this.pre.replaceChildren(out);
      this.pre.scrollTop = this.pre.scrollHeight;
    });
  }

  key(e) {
    if (e.metaKey) return;
    const sel = window.getSelection && window.getSelection().toString();
    if (e.ctrlKey && (e.key === 'c' || e.key === 'C') && sel) return; // copy the selection
    if (e.ctrlKey && e.key === 'v') return; // the paste event follows
    const map = {
      Enter: '\r', Backspace: '\x7f', Tab: '\t', Escape: '\x1b', ArrowUp: '\x1b[A', ArrowDown: '\x1b[B',
      ArrowRight: '\x1b[C', ArrowLeft: '\x1b[D', Home: '\x1b[H', End: '\x1b[F', Delete: '\x1b[3~',
      PageUp: '\x1b[5~', PageDown: '\x1b[6~', Insert: '\x1b[2~',
    };
    let out = map[e.key];
    if (!out && e.ctrlKey && e.key.length === 1) {
      const code = e.key.toUpperCase().charCodeAt(0);
      if (code >= 64 && code <= 95) out = String.fromCharCode(code - 64);
    } else if (!out && e.key.length === 1) out = (e.altKey ? '\x1b' : '') + e.key;
    if (!out) return;
    e.preventDefault();
    this.onInput(out);
  }
}

window.EdgeportTerm = Term;
