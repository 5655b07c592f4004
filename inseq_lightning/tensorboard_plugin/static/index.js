// The Attributions tab: pick a run, a probe and a step; the monitor's HTML page is shown below.
// TensorBoard runs this module in an iframe whose CSP forbids inline scripts: the pages have none
// (inline styles only), and they are inserted as parsed DOM, never evaluated.

export async function render() {
  document.body.style.fontFamily = 'Roboto, sans-serif';
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
  const page = el('div');
  page.id = 'attribution-page';
  const controls = el('div', [
    label('Run ', runSelect), label('Probe ', probeSelect), label('Step ', stepSelect), previous, next,
  ]);
  controls.style.display = 'flex';
  controls.style.gap = '12px';
  controls.style.alignItems = 'center';
  document.body.append(controls, page);

  for (const run of runs) runSelect.appendChild(option(run, run));

  const pagesOf = () => listing[runSelect.value];
  // Two monitors on one run share probe names: a probe is picked together with its monitor's prefix.
  const probeKey = (p) => `${p.prefix}|${p.probe}`;

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
    const steps = pagesOf().filter((p) => probeKey(p) === probeSelect.value).sort((a, b) => a.step - b.step);
    stepSelect.replaceChildren(...steps.map((p) => option(String(p.step), p.path)));
    stepSelect.selectedIndex = steps.length - 1; // the newest first
    show();
  }

  async function show() {
    const params = new URLSearchParams({run: runSelect.value, path: stepSelect.value});
    const html = await fetch('./page?' + params).then((r) => r.text());
    const doc = new DOMParser().parseFromString(html, 'text/html');
    page.replaceChildren(...Array.from(doc.body.childNodes));
    previous.disabled = stepSelect.selectedIndex <= 0;
    next.disabled = stepSelect.selectedIndex >= stepSelect.options.length - 1;
  }

  runSelect.addEventListener('change', fillProbes);
  probeSelect.addEventListener('change', fillSteps);
  stepSelect.addEventListener('change', show);
  previous.addEventListener('click', () => { stepSelect.selectedIndex -= 1; show(); });
  next.addEventListener('click', () => { stepSelect.selectedIndex += 1; show(); });
  fillProbes();
}

function el(tag, children) {
  const node = document.createElement(tag);
  if (typeof children === 'string') node.textContent = children;
  else if (Array.isArray(children)) node.append(...children);
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
