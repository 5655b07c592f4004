// The Attributions tab: pick a run, a probe and a step; the monitor's HTML page is shown below.
// TensorBoard runs this module in an iframe whose CSP forbids inline scripts: the pages have none
// (inline styles only), and they are inserted as parsed DOM, never evaluated.
// The compare view puts two steps of a probe side by side. Its data comes as JSON (./compare,
// ./curves) and every element is built with createElement and textContent: nothing logged is
// ever parsed as HTML.

const SVG = 'http://www.w3.org/2000/svg';
const FONT = 'Roboto, sans-serif';
const CELL = {padding: '2px 6px', border: '1px solid #ddd', textAlign: 'center', fontFamily: 'monospace',
  fontSize: '12px'};
const LINE_COLOURS = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b', '#e377c2', '#7f7f7f'];

export async function render() {
  document.body.style.fontFamily = FONT;
  document.body.style.margin = '16px';
  const status = el('p', 'Loading attribution pages…');
  document.body.appendChild(status);
  const listing = await fetch('./pages').then((r) => r.json());
  const runs = Object.keys(listing).filter((run) => listing[run].length > 0);
  if (runs.length === 0) {
    status.textContent = 'No attribution pages yet: attach the AttributionMonitor or AttributionCallback.';
    return;
  }
  status.remove();

  const runSelect = el('select');
  const probeSelect = el('select');
  const stepSelect = el('select');
  const previous = el('button', '◀ previous step');
  const next = el('button', 'next step ▶');
  const stepA = el('select');
  stepA.id = 'step-a';
  const stepB = el('select');
  stepB.id = 'step-b';
  const onePage = el('button', 'One step');
  onePage.id = 'mode-page';
  const compareMode = el('button', 'Compare two steps');
  compareMode.id = 'mode-compare';
  const page = el('div');
  page.id = 'attribution-page';
  const compare = el('div');
  compare.id = 'compare-view';
  const pageControls = row([label('Step ', stepSelect), previous, next]);
  const compareControls = row([label('Step A ', stepA), label('Step B ', stepB)]);
  const controls = row([label('Run ', runSelect), label('Probe ', probeSelect), pageControls, compareControls,
    onePage, compareMode]);
  document.body.append(controls, page, compare);

  for (const run of runs) runSelect.appendChild(option(run, run));

  const pagesOf = () => listing[runSelect.value];
  // Two monitors on one run share probe names: a probe is picked together with its monitor's prefix.
  const probeKey = (p) => `${p.prefix}|${p.probe}`;
  const entriesOf = () => pagesOf().filter((p) => probeKey(p) === probeSelect.value).sort((a, b) => a.step - b.step);
  let comparing = false;

  function fillProbes() {
    probeSelect.replaceChildren();
    const seen = new Set();
    for (const p of pagesOf()) {
      if (!seen.has(probeKey(p))) {
        seen.add(probeKey(p));
        probeSelect.appendChild(option(`${p.probe} (${p.prefix || p.method})`, probeKey(p)));
      }
    }
    fillSteps();
  }

  function fillSteps() {
    const steps = entriesOf();
    stepSelect.replaceChildren(...steps.map((p) => option(String(p.step), p.path)));
    stepSelect.selectedIndex = steps.length - 1; // the newest first
    const mapped = steps.filter((p) => typeof p.map === 'string');
    for (const select of [stepA, stepB]) select.replaceChildren(...mapped.map((p) => option(String(p.step), String(p.step))));
    stepA.selectedIndex = 0; // the oldest against the newest
    stepB.selectedIndex = mapped.length - 1;
    refresh();
  }

  function refresh() {
    pageControls.style.display = comparing ? 'none' : 'flex';
    compareControls.style.display = comparing ? 'flex' : 'none';
    page.style.display = comparing ? 'none' : 'block';
    compare.style.display = comparing ? 'block' : 'none';
    onePage.disabled = !comparing;
    compareMode.disabled = comparing;
    if (comparing) showCompare();
    else show();
  }

  async function show() {
    const params = new URLSearchParams({run: runSelect.value, path: stepSelect.value});
    const html = await fetch('./page?' + params).then((r) => r.text());
    const doc = new DOMParser().parseFromString(html, 'text/html');
    page.replaceChildren(...Array.from(doc.body.childNodes));
    previous.disabled = stepSelect.selectedIndex <= 0;
    next.disabled = stepSelect.selectedIndex >= stepSelect.options.length - 1;
  }

  let ticket = 0; // only the latest request draws: answers can arrive out of order
  async function showCompare() {
    const mine = ++ticket;
    const entry = entriesOf()[0];
    if (stepA.options.length === 0) {
      compare.dataset.shown = '';
      compare.replaceChildren(el('p', 'No maps were saved for this probe: the compare view needs the map files ' +
        'the TensorBoard sink writes beside each page since this version.'));
      return;
    }
    const probe = {run: runSelect.value, prefix: entry.prefix, probe: entry.probe};
    let data, curves;
    try {
      [data, curves] = await Promise.all([
        fetchJson('./compare?' + new URLSearchParams({...probe, a: stepA.value, b: stepB.value})),
        fetchJson('./curves?' + new URLSearchParams(probe)),
      ]);
    } catch (error) {
      if (mine === ticket) compare.replaceChildren(el('p', `The comparison could not be loaded (${error.message}).`));
      return;
    }
    if (mine !== ticket) return;
    const pick = (step, select) => { select.value = String(step); showCompare(); };
    compare.replaceChildren(...compareView(data, curves, {
      showAsB: (step) => pick(step, stepB), showAsA: (step) => pick(step, stepA)}));
    compare.dataset.shown = `${stepA.value}|${stepB.value}`;
  }

  runSelect.addEventListener('change', fillProbes);
  probeSelect.addEventListener('change', fillSteps);
  stepSelect.addEventListener('change', show);
  stepA.addEventListener('change', showCompare);
  stepB.addEventListener('change', showCompare);
  previous.addEventListener('click', () => { stepSelect.selectedIndex -= 1; show(); });
  next.addEventListener('click', () => { stepSelect.selectedIndex += 1; show(); });
  onePage.addEventListener('click', () => { comparing = false; refresh(); });
  compareMode.addEventListener('click', () => { comparing = true; refresh(); });
  fillProbes();
}

// ---- the compare view ------------------------------------------------------------------------------------------------
function compareView(data, curves, actions) {
  const {a, b} = data;
  const nodes = [el('h3', `${a.probe} · ${a.method} · step ${a.step} (A) and step ${b.step} (B)`)];
  const scale = scoreRange([...cells(a.scores), ...cells(b.scores)]);
  const sides = top(row([
    section(`A: step ${a.step}`, mapTable(a, 'a', (v) => heat(v, scale))),
    section(`B: step ${b.step}`, mapTable(b, 'b', (v) => heat(v, scale))),
  ]));
  sides.style.flexWrap = 'wrap';
  nodes.push(sides);

  if (data.mismatch) {
    const why = el('p', data.mismatch);
    why.id = 'compare-mismatch';
    why.style.color = '#a00';
    nodes.push(el('h4', 'Difference (B − A)'), why);
  } else {
    const limit = data.limit > 0 ? data.limit : 1e-12;
    const difference = {...a, scores: data.difference, step_scores: {}};
    nodes.push(section('Difference (B − A)', mapTable(difference, 'difference', (v) => diverging(v, limit), signed)),
      legend(data.limit), top(row([tokenList('Gained most', data.gained, 'gained'),
        tokenList('Lost most', data.lost, 'lost')])));
  }
  nodes.push(...curveCharts(curves, a.step, b.step, actions));
  return nodes;
}

function mapTable(map, side, colour, format = fixed) {
  const table = el('table');
  table.dataset.side = side;
  table.style.borderCollapse = 'collapse';
  table.style.margin = '8px 0';
  const head = el('tr', [cell('th', '')]);
  for (const column of map.columns) head.appendChild(cell('th', column, {background: '#f4f4f4'}));
  table.appendChild(el('thead', [head]));
  const body = el('tbody');
  const evidence = new Set(map.evidence_rows || []);
  let group = null;
  map.rows.forEach((label, i) => {
    if (map.row_groups && map.row_groups[i] !== group) {
      group = map.row_groups[i];
      const title = cell('td', group === 'source' ? 'Source' : 'Target prefix',
        {textAlign: 'left', fontWeight: 'bold', background: '#fafafa'});
      title.colSpan = map.columns.length + 1;
      body.appendChild(el('tr', [title]));
    }
    const header = cell('th', (evidence.has(i) ? '▸ ' : '') + label, {textAlign: 'right', background: '#f4f4f4'});
    header.dataset.row = String(i);
    const tr = el('tr', [header]);
    map.scores[i].forEach((value, j) => {
      const background = colour(value);
      const td = cell('td', value === null ? '' : format(value), {background, color: textColour(background)});
      td.dataset.row = String(i);
      td.dataset.column = String(j);
      if (value !== null) td.title = String(value);
      tr.appendChild(td);
    });
    body.appendChild(tr);
  });
  for (const [name, values] of Object.entries(map.step_scores || {})) {
    const tr = el('tr', [cell('th', name, {textAlign: 'right', fontStyle: 'italic'})]);
    tr.dataset.stepScore = name;
    for (const value of values) tr.appendChild(cell('td', value === null ? '' : fixed(value)));
    body.appendChild(tr);
  }
  table.appendChild(body);
  return table;
}

function legend(limit) {
  const bar = el('div');
  bar.style.width = '240px';
  bar.style.height = '12px';
  bar.style.border = '1px solid #ccc';
  bar.style.background = `linear-gradient(to right, ${diverging(-1, 1)}, ${diverging(0, 1)}, ${diverging(1, 1)})`;
  const ticks = row([el('span', `−${fixed(limit)}`), el('span', '0'), el('span', `+${fixed(limit)}`)]);
  ticks.style.width = '240px';
  ticks.style.justifyContent = 'space-between';
  ticks.style.fontSize = '12px';
  const node = el('div', [bar, ticks, el('p', 'Blue: less attribution at B than at A; red: more.')]);
  node.id = 'difference-legend';
  return node;
}

function tokenList(title, tokens, id) {
  const list = el('ol');
  list.id = id;
  for (const t of tokens) {
    const item = el('li', [token(t.token), document.createTextNode(` ${signed(t.change)} (${fixed(t.a)} → ${fixed(t.b)})`)]);
    item.dataset.row = String(t.row);
    item.dataset.change = String(t.change);
    list.appendChild(item);
  }
  const note = tokens.length === 0 ? [el('p', 'none')] : [];
  return section(`${title} (summed over the attributed tokens)`, list, ...note);
}

function curveCharts(curves, stepA, stepB, actions) {
  const nodes = [];
  for (const [group, title] of [['drift', 'Drift'], ['faithfulness', 'Faithfulness']]) {
    const shown = curves.curves.filter((c) => c.group === group && c.values.some((v) => v !== null));
    nodes.push(el('h4', `${title} per step`));
    if (shown.length === 0) {
      nodes.push(el('p', group === 'faithfulness'
        ? 'Not measured: ProbeMonitor(faithfulness=True) measures it.' : 'Needs at least two steps.'));
      continue;
    }
    const charts = row(shown.map((curve) => chart(curve, curves.steps, stepA, stepB, actions)));
    charts.style.flexWrap = 'wrap';
    nodes.push(charts);
  }
  nodes.push(el('p', 'Click a point to show its step as B (shift-click: as A).'), valuesTable(curves, stepA, stepB));
  return nodes;
}

function chart(curve, steps, stepA, stepB, actions) {
  const [width, height, left, right, top, bottom] = [240, 130, 44, 10, 8, 20];
  const points = steps.map((step, i) => [step, curve.values[i]]).filter(([, v]) => v !== null);
  const values = points.map(([, v]) => v);
  let [lo, hi] = [Math.min(...values), Math.max(...values)];
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  const [first, last] = [steps[0], steps[steps.length - 1]];
  const x = (step) => left + (last === first ? 0.5 : (step - first) / (last - first)) * (width - left - right);
  const y = (v) => top + (1 - (v - lo) / (hi - lo)) * (height - top - bottom);
  const svg = svgEl('svg', {width, height, role: 'img'});
  svg.dataset.name = curve.name;
  svg.appendChild(svgEl('rect', {x: left, y: top, width: width - left - right, height: height - top - bottom,
    fill: '#fafafa', stroke: '#ddd'}));
  for (const [step, mark] of [[stepA, 'A'], [stepB, 'B']]) {
    if (step < first || step > last) continue;
    svg.appendChild(svgEl('line', {x1: x(step), x2: x(step), y1: top, y2: height - bottom, stroke: '#999',
      'stroke-dasharray': '3 3'}));
    svg.appendChild(svgText(mark, {x: x(step) + 2, y: top + 10, 'font-size': 10, fill: '#666'}));
  }
  svg.appendChild(svgEl('polyline', {points: points.map(([s, v]) => `${x(s)},${y(v)}`).join(' '), fill: 'none',
    stroke: '#1f77b4', 'stroke-width': 1.5}));
  for (const [step, value] of points) {
    const dot = svgEl('circle', {cx: x(step), cy: y(value), r: 4, fill: '#1f77b4', cursor: 'pointer'});
    dot.dataset.step = String(step);
    dot.dataset.value = String(value);
    dot.appendChild(svgText(`${curve.name} at step ${step}: ${fixed4(value)}`, {}, 'title'));
    dot.addEventListener('click', (event) => (event.shiftKey ? actions.showAsA : actions.showAsB)(step));
    svg.appendChild(dot);
  }
  for (const [v, anchor] of [[hi, top + 8], [lo, height - bottom]]) {
    svg.appendChild(svgText(fixed4(v), {x: left - 4, y: anchor, 'text-anchor': 'end', 'font-size': 10}));
  }
  for (const step of [first, last]) {
    svg.appendChild(svgText(String(step), {x: x(step), y: height - 6, 'text-anchor': 'middle', 'font-size': 10}));
  }
  const better = curve.better ? ` (${curve.better} is better)` : '';
  const caption = el('div', curve.name + better);
  caption.style.fontSize = '12px';
  return el('figure', [caption, svg]);
}

function valuesTable(curves, stepA, stepB) {
  const at = (curve, step) => {
    const i = curves.steps.indexOf(step);
    return i < 0 ? null : curve.values[i];
  };
  const table = el('table', [el('thead', [el('tr', [cell('th', 'value'), cell('th', `A: step ${stepA}`),
    cell('th', `B: step ${stepB}`), cell('th', 'B − A')])])]);
  table.id = 'compare-values';
  table.style.borderCollapse = 'collapse';
  const body = el('tbody');
  for (const curve of curves.curves) {
    const [a, b] = [at(curve, stepA), at(curve, stepB)];
    if (a === null && b === null) continue;
    const tr = el('tr', [cell('th', curve.name, {textAlign: 'left'}), cell('td', a === null ? '–' : fixed4(a)),
      cell('td', b === null ? '–' : fixed4(b)), cell('td', a === null || b === null ? '–' : signed4(b - a))]);
    tr.dataset.name = curve.name;
    body.appendChild(tr);
  }
  table.appendChild(body);
  return section('Values at A and B', table);
}

// ---- colours: the scale of the HTML pages (viz/colors.py), and a diverging one for differences -----------------------
function scoreRange(values) {
  let lo = Math.min(0, ...values);
  let hi = values.length ? Math.max(...values) : 1;
  if (hi <= lo) hi = lo + 1e-12;
  return [lo, hi];
}

function heat(value, [lo, hi]) {
  if (value === null) return 'rgb(255, 255, 255)';
  let x;
  if (lo < 0 && 0 < hi) x = Math.max(-1, Math.min(1, value >= 0 ? value / hi : -(value / lo)));
  else x = Math.max(0, Math.min(1, (value - lo) / (hi - lo)));
  return fade(x);
}

function diverging(value, limit) {
  return value === null ? 'rgb(255, 255, 255)' : fade(Math.max(-1, Math.min(1, value / limit)));
}

function fade(x) { // -1 blue, 0 white, +1 red
  const f = Math.round(255 * (1 - Math.abs(x)));
  return x >= 0 ? `rgb(255, ${f}, ${f})` : `rgb(${f}, ${f}, 255)`;
}

function textColour(background) {
  const [r, g, b] = background.match(/\d+/g).map(Number);
  return 0.299 * r + 0.587 * g + 0.114 * b > 140 ? '#000000' : '#ffffff';
}

// ---- small helpers ------------------------------------------------------------------------------------------------
const fixed = (v) => v.toFixed(3);
const fixed4 = (v) => v.toFixed(4);
const signed = (v) => (v >= 0 ? '+' : '−') + Math.abs(v).toFixed(3);
const signed4 = (v) => (v >= 0 ? '+' : '−') + Math.abs(v).toFixed(4);
const cells = (scores) => scores.flat().filter((v) => v !== null);

async function fetchJson(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.json();
}

function el(tag, children) {
  const node = document.createElement(tag);
  if (typeof children === 'string') node.textContent = children;
  else if (Array.isArray(children)) node.append(...children);
  return node;
}

function cell(tag, text, style = {}) {
  const node = el(tag, text);
  Object.assign(node.style, CELL, style);
  return node;
}

function token(text) { // a token as text, its spaces visible
  const node = el('code', text.replaceAll(' ', '␣') || '∅');
  node.style.background = '#f4f4f4';
  return node;
}

function row(children) {
  const node = el('div', children);
  node.style.display = 'flex';
  node.style.gap = '12px';
  node.style.alignItems = 'center';
  return node;
}

function top(node) { // a row whose children line up at their top
  node.style.alignItems = 'flex-start';
  return node;
}

function section(title, ...children) {
  return el('div', [el('h4', title), ...children]);
}

function svgEl(tag, attributes) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  return node;
}

function svgText(text, attributes, tag = 'text') {
  const node = svgEl(tag, attributes);
  node.textContent = text;
  return node;
}

function label(text, control) {
  return el('label', [document.createTextNode(text), control]);
}

function option(text, value) {
  const node = el('option', text);
  node.value = value;
  return node;
}
