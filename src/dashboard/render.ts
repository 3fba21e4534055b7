import type { Dashboard, DashboardPolicy, DashboardSingleton, RunSummary } from './data.js'

/** Text for HTML: every value from the database goes through here. */
function esc(value: unknown): string {
  return String(value ?? '')
    .replaceAll('&', '&amp;')
    .replaceAll('<', '&lt;')
    .replaceAll('>', '&gt;')
    .replaceAll('"', '&quot;')
    .replaceAll("'", '&#39;')
}

const time = (value: Date | null) =>
  value ? value.toISOString().replace('T', ' ').slice(0, 19) : '-'

function ago(now: Date, then: Date | null): string {
  if (!then) return '-'
  const s = Math.max(0, Math.round((now.getTime() - then.getTime()) / 1000))
  if (s < 120) return `${s} s ago`
  if (s < 7200) return `${Math.round(s / 60)} min ago`
  if (s < 172_800) return `${Math.round(s / 3600)} h ago`
  return `${Math.round(s / 86_400)} d ago`
}

/** A stable colour per node, so a node's terms read as one. */
function colour(node: string): string {
  // FNV-1a, then murmur3's finaliser: names that differ in one character (node-1, node-2)
  // land far apart on the colour wheel.
  let hash = 0x811c9dc5
  for (const ch of node) hash = Math.imul(hash ^ ch.charCodeAt(0), 0x01000193)
  hash = Math.imul(hash ^ (hash >>> 16), 0x85ebca6b)
  hash = Math.imul(hash ^ (hash >>> 13), 0xc2b2ae35)
  hash = (hash ^ (hash >>> 16)) >>> 0
  return `hsl(${hash % 360} 55% 48%)`
}

/** The terms as bars on a time axis, from the oldest shown to now. */
function timeline(now: Date, s: DashboardSingleton): string {
  const terms = [...s.terms].reverse()
  if (terms.length === 0) return '<p class="muted">No term yet.</p>'
  const from = terms[0]?.acquiredAt.getTime() ?? now.getTime()
  const span = Math.max(1000, now.getTime() - from)
  const width = 900
  const x = (t: number) => ((t - from) / span) * width
  const bars = terms.map((t) => {
    const start = x(t.acquiredAt.getTime())
    const end = x((t.endedAt ?? now).getTime())
    const w = Math.max(2, end - start)
    const title = `epoch ${t.epoch}: ${t.nodeId}, ${time(t.acquiredAt)} to ${t.endedAt ? `${time(t.endedAt)} (${t.endReason})` : 'now'}`
    return `<rect x="${start.toFixed(1)}" y="4" width="${w.toFixed(1)}" height="22" rx="3" fill="${colour(t.nodeId)}"${t.endedAt ? '' : ' class="current"'}><title>${esc(title)}</title></rect>${w > 60 ? `<text x="${(start + 4).toFixed(1)}" y="19">${esc(t.nodeId)}</text>` : ''}`
  })
  return `<svg class="timeline" viewBox="0 0 ${width} 30" role="img" aria-label="terms of ${esc(s.name)}">${bars.join('')}</svg>
<div class="axis"><span>${esc(time(new Date(from)))}</span><span>now</span></div>`
}

function termsTable(s: DashboardSingleton): string {
  if (s.terms.length === 0) return ''
  const rows = s.terms
    .slice(0, 8)
    .map(
      (t) =>
        `<tr><td>${t.epoch}</td><td><span class="dot" style="background:${colour(t.nodeId)}"></span>${esc(t.nodeId)}</td><td>${esc(time(t.acquiredAt))}</td><td>${t.endedAt ? esc(time(t.endedAt)) : '<b>holding</b>'}</td><td>${t.endReason ? `<span class="badge ${esc(t.endReason)}">${esc(t.endReason)}</span>${t.closedBy === 'successor' ? ' <span class="muted">(closed by the next holder)</span>' : ''}` : ''}</td></tr>`,
    )
  return `<table class="terms"><thead><tr><th>epoch</th><th>node</th><th>from</th><th>to</th><th>ended</th></tr></thead><tbody>${rows.join('')}</tbody></table>`
}

/** Rows deleted per run (cleanups), or each run's status (tasks), oldest to newest. */
function runChart(p: DashboardPolicy): string {
  const runs = [...p.runs].reverse()
  if (runs.length === 0) return '<span class="muted">no run yet</span>'
  const w = 12
  const height = 40
  if (p.kind === 'task') {
    const dots = runs.map(
      (r, i) =>
        `<rect x="${i * w}" y="12" width="${w - 3}" height="16" rx="2" class="run ${esc(r.status)}"><title>${esc(runTitle(r))}</title></rect>`,
    )
    return `<svg class="runs" width="${runs.length * w}" height="${height}" role="img" aria-label="runs of ${esc(p.policy)}">${dots.join('')}</svg>`
  }
  const max = Math.max(1, ...runs.map((r) => r.rowsDeleted))
  const bars = runs.map((r, i) => {
    const h = Math.max(r.rowsDeleted > 0 ? 2 : 1, (r.rowsDeleted / max) * (height - 2))
    return `<rect x="${i * w}" y="${(height - h).toFixed(1)}" width="${w - 3}" height="${h.toFixed(1)}" class="run ${esc(r.status)}"><title>${esc(runTitle(r))}</title></rect>`
  })
  return `<svg class="runs" width="${runs.length * w}" height="${height}" role="img" aria-label="rows deleted per run of ${esc(p.policy)}">${bars.join('')}</svg>`
}

function runTitle(r: RunSummary): string {
  return `run ${r.id}, ${r.status}, slot ${time(r.scheduledFor)}, ${r.rowsDeleted} rows deleted${r.nodeId ? `, on ${r.nodeId}` : ''}, epoch ${r.epoch}${r.error ? `: ${r.error}` : ''}`
}

function policyRow(now: Date, p: DashboardPolicy): string {
  const schedule = p.cron
    ? `cron <code>${esc(p.cron)}</code> ${esc(p.cronTimeZone)}`
    : `every ${esc(p.every)}`
  const flags = [
    p.paused ? '<span class="badge paused">paused</span>' : '',
    p.overdue ? '<span class="badge overdue">overdue</span>' : '',
    p.agreement === 'disagree' ? '<span class="badge disagree">nodes disagree</span>' : '',
    p.openRunStatus ? `<span class="badge open">${esc(p.openRunStatus)}</span>` : '',
  ].join(' ')
  const last = p.lastRunAt
    ? `${esc(p.lastStatus)} ${esc(ago(now, p.lastRunAt))}${p.kind === 'cleanup' ? `, ${esc(p.lastRowsDeleted)} rows` : ''}`
    : '-'
  const error = p.lastError
    ? `<div class="error">${esc(ago(now, p.lastErrorAt))}: ${esc(p.lastError)}</div>`
    : ''
  return `<tr><td><b>${esc(p.policy)}</b><div class="muted">${esc(p.kind)}</div></td><td>${schedule}<div class="muted">next ${esc(time(p.nextRunAt))}</div></td><td>${flags}</td><td>${last}<div class="muted">success ${esc(ago(now, p.lastSuccessAt))}${p.kind === 'cleanup' ? `; ${esc(p.rowsDeleted24h)} rows in 24 h` : ''}</div>${error}</td><td>${runChart(p)}</td></tr>`
}

function singletonSection(now: Date, s: DashboardSingleton): string {
  const st = s.status
  const holder = s.node_id
    ? `<span class="dot" style="background:${colour(s.node_id)}"></span><b class="holder">${esc(s.node_id)}</b> <span class="muted">epoch ${esc(st?.epoch)}, since ${esc(time(st?.acquiredAt ?? null))}, heartbeat ${esc(ago(now, st?.heartbeatAt ?? null))}</span>`
    : `<b class="holder none">nobody</b>${st ? ` <span class="muted">(last: ${esc(st.lastNodeId)}, epoch ${esc(st.lastEpoch)})</span>` : ''}`
  const queue = st && st.waitingNodeIds.length > 0 ? st.waitingNodeIds.map(esc).join(', ') : 'none'
  const policies =
    s.policies.length === 0
      ? '<p class="muted">No policy or task yet.</p>'
      : `<table class="policies"><thead><tr><th>policy / task</th><th>schedule</th><th></th><th>last run</th><th>runs</th></tr></thead><tbody>${s.policies.map((p) => policyRow(now, p)).join('')}</tbody></table>`
  return `<section class="singleton" data-name="${esc(s.name)}">
<h2>${esc(s.name)}</h2>
<p>holder: <span class="holder-line" data-holder="${esc(s.node_id ?? '')}">${holder}</span></p>
<p>queue: <span class="queue">${queue}</span></p>
<h3>Terms</h3>
${timeline(now, s)}
${termsTable(s)}
<h3>Policies and tasks</h3>
${policies}
</section>`
}

/** The part of the page that refreshes. */
export function renderFragment(d: Dashboard): string {
  const body =
    d.singletons.length === 0
      ? '<p>No singleton has run against this database yet.</p>'
      : d.singletons.map((s) => singletonSection(d.now, s)).join('\n')
  return `<p class="muted">as of ${esc(time(d.now))} UTC (database clock)</p>\n${body}`
}

const STYLE = `
body{font:14px/1.45 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 20px}header h1{font-size:18px;margin:0}
main{padding:8px 20px 40px;max-width:1100px}
section.singleton{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:6px 16px 12px;margin:14px 0}
h2{margin:8px 0 4px}h3{font-size:14px;margin:14px 0 4px;color:#4a5468}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:4px 6px;border-bottom:1px solid #eef0f4;vertical-align:top}
th{font-weight:600;color:#4a5468;font-size:12px}
.muted{color:#77819a;font-size:12px}.error{color:#b3261e;font-size:12px;max-width:420px}
.dot{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:5px}
.badge{display:inline-block;padding:0 6px;border-radius:9px;font-size:12px;background:#e8ebf1}
.badge.paused{background:#fff2cc}.badge.overdue,.badge.disagree{background:#fbd9d6;color:#8c1d18}
.badge.lost,.badge.fenced,.badge.superseded{background:#fde7d0}.badge.released{background:#dcefdc}
svg.timeline{width:100%;height:30px;background:#f0f2f6;border-radius:4px}svg.timeline text{font-size:11px;fill:#fff}
svg.timeline rect.current{stroke:#1d2330;stroke-width:1.5}
.axis{display:flex;justify-content:space-between;font-size:11px;color:#77819a}
.run{fill:#9aa5b8}.run.done{fill:#3b8f4a}.run.failed,.run.exhausted{fill:#c0392b}.run.fenced{fill:#e0a030}
.run.running,.run.scheduled{fill:#3b6fd1}
code{font-size:12px}
`

const SCRIPT = `
(() => {
  const live = document.getElementById('live')
  let busy = false, again = false
  async function refresh() {
    if (busy) { again = true; return }
    busy = true
    try {
      const response = await fetch('/fragment', { cache: 'no-store' })
      if (response.ok) live.innerHTML = await response.text()
    } catch {}
    busy = false
    if (again) { again = false; refresh() }
  }
  const events = new EventSource('/events')
  events.onmessage = refresh
  events.onerror = () => setTimeout(refresh, 2000)
})()
`

/** The whole page: rendered here, readable without JavaScript; a small script keeps it live. */
export function renderPage(d: Dashboard): string {
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>pg-singleton status</title>
<noscript><meta http-equiv="refresh" content="5"></noscript>
<style>${STYLE}</style></head>
<body><header><h1>pg-singleton</h1></header>
<main id="live">${renderFragment(d)}</main>
<script>${SCRIPT}</script>
</body></html>`
}
