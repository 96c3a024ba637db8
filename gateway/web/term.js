// A small terminal for the web console: the VT100/xterm subset a shell prompt, ls, top
// and less need (cursor moves, erase, scroll region, insert/delete), drawn into a <pre>.
// SGR: the 16 colours (classes in app.css), xterm's 256 colours and 24-bit colour (inline
// styles), bold and inverse. A cell with attributes is its character followed by one marker
// code point (plane 16, U+100000 + the index of its style in the terminal's style table).
// Lines that scroll off the screen are rendered once into the scrollback; each frame
// redraws only the screen. Written for Edgeport (Apache-2.0), no dependencies.
'use strict';

const MARK = 0x100000;
// Distinct styles a terminal keeps (plane 16 has room for 65,534 markers); past this, new
// combinations are drawn without colour rather than growing the table for ever.
const MAX_STYLES = 60000;
// Lines kept in the scrollback.
const SCROLLBACK = 1000;
// Default text and background colours (app.css .term), for inverse video.
const DEFAULT_FG = '#e6e6e6';
const DEFAULT_BG = '#111';

// xterm's colours 16-255: a 6x6x6 cube, then 24 greys.
function palette(n) {
  if (n < 232) {
    const i = n - 16; const v = (c) => (c ? 55 + c * 40 : 0);
    return `rgb(${v(Math.floor(i / 36))}, ${v(Math.floor(i / 6) % 6)}, ${v(i % 6)})`;
  }
  const g = 8 + (n - 232) * 10;
  return `rgb(${g}, ${g}, ${g})`;
}

// A colour is -1 (the default), 0-255 (a palette entry) or an 'rgb(...)' string.
// Returns [class, inline colour]: the 16 named colours are classes (prefix f or b).
function paint(c, prefix) {
  if (c === -1) return ['', ''];
  if (typeof c === 'string') return ['', c];
  return c < 16 ? [`${prefix}${c}`, ''] : ['', palette(c)];
}

// How a style is drawn: classes and inline colours for a <span>.
function look(fg, bg, bold, inv) {
  let text; let back; const cls = [];
  if (!inv) { text = paint(fg, 'f'); back = paint(bg, 'b'); } else if (fg === -1 && bg === -1) {
    text = ['', '']; back = ['', '']; cls.push('inv');
  } else {
    // Inverse with a colour: the background's colour is the text's and the other way round.
    text = bg === -1 ? ['', DEFAULT_BG] : paint(bg, 'f');
    back = fg === -1 ? ['', DEFAULT_FG] : paint(fg, 'b');
  }
  if (text[0]) cls.push(text[0]);
  if (back[0]) cls.push(back[0]);
  if (bold) cls.push('bold');
  return { cls: cls.join(' '), color: text[1], background: back[1] };
}

// Appends runs of cells with the same style to a node: one text node or <span> per run.
// (A fragment, not replaceChildren(...nodes): a long line makes more nodes than a call may
// take as arguments.)
class Runs {
  constructor(styles, out) { this.styles = styles; this.out = out; this.run = ''; this.style = 0; }

  flush() {
    if (!this.run) return;
    const st = this.styles[this.style];
    if (this.style && st && (st.cls || st.color || st.background)) {
      const s = document.createElement('span');
      if (st.cls) s.className = st.cls;
      if (st.color) s.style.color = st.color;
      if (st.background) s.style.background = st.background;
      s.textContent = this.run;
      this.out.append(s);
    } else this.out.append(this.run);
    this.run = '';
  }

  add(text, style) { if (style !== this.style) { this.flush(); this.style = style; } this.run += text; }

  // One line of cells, trailing blanks cut unless the cursor stands there.
  line(cells, cursorAt) {
    let end = cells.length;
    while (end > 0 && cells[end - 1] === ' ') end--;
    if (cursorAt !== undefined) end = Math.max(end, cursorAt + 1);
    for (let i = 0; i < end; i++) {
      const cell = cells[i] || ' ';
      const cp = cell.codePointAt(cell.length - 2);
      const style = cell.length > 1 && cp >= MARK ? cp - MARK : 0;
      const glyph = style ? cell.slice(0, -2) : cell;
      if (i === cursorAt) {
        this.flush(); this.style = 0;
        const cur = document.createElement('span');
        cur.className = 'cursor'; cur.textContent = glyph;
        this.out.append(cur);
      } else this.add(glyph, style);
    }
  }
}

class Term {
  constructor(pre, onInput) {
    this.pre = pre;
    this.onInput = onInput || (() => {});
    this.decoder = new TextDecoder('utf-8');
    this.cols = 80; this.rows = 24;
    // The scrollback's lines, each a <span> ending in a newline, then the screen.
    this.back = document.createElement('span');
    this.live = document.createElement('span');
    pre.replaceChildren(this.back, this.live);
    this.clear();
    this.pending = false;
    pre.tabIndex = 0;
    pre.addEventListener('keydown', (e) => this.key(e));
    pre.addEventListener('paste', (e) => {
      e.preventDefault();
      const t = (e.clipboardData || window.clipboardData).getData('text');
      if (t) this.onInput(t.replace(/\r?\n/g, '\r'));
    });
  }

  // Forgets everything: the screen, the scrollback and the styles.
  clear() {
    this.unrendered = [];
    this.back.replaceChildren();
    this.styles = [null]; this.styleIndex = new Map();
    // Bold and inverse without colour come first, so a full table can still draw them.
    for (const [bold, inv] of [[1, 0], [0, 1], [1, 1]]) this.styleOf(-1, -1, bold, inv);
    this.pen = { fg: -1, bg: -1, bold: 0, inv: 0 };
    this.reset();
  }

  reset() {
    this.screen = [];
    for (let i = 0; i < this.rows; i++) this.screen.push(this.blank());
    this.x = 0; this.y = 0; this.top = 0; this.bottom = this.rows - 1;
    this.state = 0; this.params = ''; this.saved = [0, 0]; this.attr = 0;
    this.pen = { fg: -1, bg: -1, bold: 0, inv: 0 };
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
    // As the gateway clamps them (a recording's header or a window says anything).
    cols = Math.max(10, Math.min(500, Math.floor(cols) || 80));
    rows = Math.max(2, Math.min(300, Math.floor(rows) || 24));
    if (cols === this.cols && rows === this.rows) return;
    const fix = (line) => line.slice(0, cols).concat(new Array(Math.max(0, cols - line.length)).fill(' '));
    this.cols = cols;
    this.screen = this.screen.map(fix);
    while (this.screen.length > rows) {
      if (this.y > 0) { this.unrendered.push(this.screen.shift()); this.y--; } else this.screen.pop();
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
      if (this.top === 0) { this.unrendered.push(gone); if (this.unrendered.length > SCROLLBACK) this.unrendered.shift(); }
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
      // Parameters longer than any real sequence's are cut (a stream of digits is no reason
      // to grow without end).
      if (c >= '@' && c <= '~') { this.state = 0; this.csi(c, this.params); } else if (this.params.length < 64) this.params += c;
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

  // SGR: updates the pen, then this.attr is its style's index (0: no attributes).
  sgr(n) {
    const p = this.pen;
    const byte = (v) => Number.isInteger(v) && v >= 0 && v <= 255;
    for (let i = 0; i < n.length; i++) {
      const v = Number.isNaN(n[i]) ? 0 : n[i];
      if (v === 0) { p.fg = -1; p.bg = -1; p.bold = 0; p.inv = 0; }
      else if (v === 1) p.bold = 1;
      else if (v === 22) p.bold = 0;
      else if (v === 7) p.inv = 1;
      else if (v === 27) p.inv = 0;
      else if (v >= 30 && v <= 37) p.fg = v - 30;
      else if (v === 39) p.fg = -1;
      else if (v >= 40 && v <= 47) p.bg = v - 40;
      else if (v === 49) p.bg = -1;
      else if (v >= 90 && v <= 97) p.fg = v - 82;
      else if (v >= 100 && v <= 107) p.bg = v - 92;
      else if (v === 38 || v === 48) { // 5;N (xterm's 256) or 2;R;G;B
        let c;
        if (n[i + 1] === 5) {
          if (byte(n[i + 2])) c = n[i + 2];
          i += 2;
        } else if (n[i + 1] === 2) {
          if (byte(n[i + 2]) && byte(n[i + 3]) && byte(n[i + 4])) c = `rgb(${n[i + 2]}, ${n[i + 3]}, ${n[i + 4]})`;
          i += 4;
        }
        if (c !== undefined) { if (v === 38) p.fg = c; else p.bg = c; }
      }
    }
    this.attr = this.styleOf(p.fg, p.bg, p.bold, p.inv);
  }

  // The index of a style in this terminal's table, added on first use.
  styleOf(fg, bg, bold, inv) {
    if (fg === -1 && bg === -1 && !bold && !inv) return 0;
    const key = `${fg}/${bg}/${bold}/${inv}`;
    let i = this.styleIndex.get(key);
    if (i === undefined) {
      if (this.styles.length >= MAX_STYLES) return this.styleIndex.get(`-1/-1/${bold}/${inv}`) || 0;
      i = this.styles.length;
      this.styles.push(look(fg, bg, bold, inv));
      this.styleIndex.set(key, i);
    }
    return i;
  }

  csi(f, p) {
    const priv = p.startsWith('?');
    const n = (priv ? p.slice(1) : p).split(';').map((v) => parseInt(v, 10));
    const a = (i, d) => (Number.isNaN(n[i]) || n[i] === undefined || n[i] === 0 ? d : n[i]);
    // A count of characters or lines: never more than the screen has (ESC[999999999S would
    // otherwise scroll a billion times).
    const cols = (i) => Math.min(a(i, 1), this.cols);
    const lines = (i) => Math.min(a(i, 1), this.rows);
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
      case 'X': row.fill(' ', this.x, this.x + cols(0)); break;
      case 'P': row.splice(this.x, cols(0)); while (row.length < this.cols) row.push(' '); break;
      case '@': row.splice(this.x, 0, ...new Array(cols(0)).fill(' ')); row.length = this.cols; break;
      case 'L': for (let i = 0; i < lines(0); i++) { this.screen.splice(this.bottom, 1); this.screen.splice(this.y, 0, this.blank()); } break;
      case 'M': for (let i = 0; i < lines(0); i++) { this.screen.splice(this.y, 1); this.screen.splice(this.bottom, 0, this.blank()); } break;
      case 'S': for (let i = 0; i < lines(0); i++) this.scroll(true); break;
      case 'T': for (let i = 0; i < lines(0); i++) this.scroll(false); break;
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
      // Lines that scrolled off since the last frame are rendered once, into the scrollback.
      if (this.unrendered.length) {
        const lines = document.createDocumentFragment();
        for (const cells of this.unrendered) {
          const l = document.createElement('span');
          const runs = new Runs(this.styles, l);
          runs.line(cells);
          runs.add('\n', 0);
          runs.flush();
          lines.append(l);
        }
        this.unrendered = [];
        this.back.append(lines);
        let extra = this.back.childElementCount - SCROLLBACK;
        while (extra-- > 0) this.back.firstElementChild.remove();
      }
      const out = document.createDocumentFragment();
      const runs = new Runs(this.styles, out);
      let last = this.rows - 1;
      while (last > this.y && this.screen[last].every((c) => c === ' ')) last--;
      for (let i = 0; i <= last; i++) {
        if (i > 0) runs.add('\n', 0);
        runs.line(this.screen[i], i === this.y ? this.x : undefined);
      }
      runs.flush();
      this.live.replaceChildren(out);
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
