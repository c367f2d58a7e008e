// The p2pex node's web view.  Live updates come from the WebSocket
// GET /v1/stream (hello, book, fill, revoked, final, order, error); node status
// and peers from GET /v1/status, polled at most once a second; orders go to
// POST /v1/orders and DELETE /v1/orders/{id} with the API token, which is kept
// in this tab's sessionStorage only.  Everything that comes from the node is put
// into the page as text (textContent / text nodes), never as HTML.
(() => {
  "use strict";

  const TOKEN_KEY = "p2pex.token";
  const TAPE_MAX = 100; // fills kept in the tape and the chart
  const STATUS_EVERY_MS = 1000; // never poll faster than this
  const HIDDEN_EVERY_MS = 5000; // while the tab is hidden
  const RECONNECT_MIN_MS = 1000;
  const RECONNECT_MAX_MS = 10000;
  const ORDER_STATES_LIVE = new Set(["open", "partially_filled"]);
  const MINE_KEPT = 50; // orders listed from this tab
  const MINE_REFRESHED = 20; // of which the newest are refreshed from the node

  const $ = (id) => document.getElementById(id);

  // ---- DOM helpers: text only ------------------------------------------------

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") e.className = String(v);
      else e.setAttribute(k, String(v));
    }
    for (const c of children) {
      if (c === undefined || c === null) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function setText(id, text) {
    const e = $(id);
    if (e.textContent !== text) e.textContent = text;
  }

  const short = (hex) => (typeof hex === "string" ? hex.slice(0, 8) : "");
  const num = (v) => (v === null || v === undefined ? "—" : String(v));
  const isInt = (v) => Number.isSafeInteger(v);

  // ---- state -------------------------------------------------------------------

  const state = {
    gen: 0, // WebSocket generation: events of an older connection are ignored
    retry: 0,
    live: false,
    book: { bids: [], asks: [] },
    fills: new Map(), // "taker:maker" -> fill; one fill per (taker, maker) pair
    arrival: 0,
    revoked: 0,
    buffer: null, // fill events held while the tape is (re)loaded
    status: null,
    mine: new Map(), // order id -> view, orders placed from this tab
    mineDirty: false, // a fill touched one of them: refresh on the next status tick
    frontier: null, // the final frontier at the last status tick
    dirty: { book: false, tape: false },
    frame: false,
  };

  // ---- rendering, coalesced to one animation frame -----------------------------

  function schedule(what) {
    state.dirty[what] = true;
    if (state.frame) return;
    state.frame = true;
    requestAnimationFrame(() => {
      state.frame = false;
      if (state.dirty.book) { state.dirty.book = false; renderBook(); }
      if (state.dirty.tape) { state.dirty.tape = false; renderTape(); }
    });
  }

  // ---- book: ladder and depth chart ----------------------------------------------

  function levels(raw) {
    const out = [];
    if (!Array.isArray(raw)) return out;
    for (const lv of raw) {
      if (Array.isArray(lv) && isInt(lv[0]) && isInt(lv[1])) out.push([lv[0], lv[1]]);
      else if (lv && isInt(lv.price) && isInt(lv.qty)) out.push([lv.price, lv.qty]);
    }
    return out;
  }

  function setBook(ev) {
    state.book = { bids: levels(ev.bids), asks: levels(ev.asks) };
    schedule("book");
  }

  function ladderRows(side, lvls, maxQty) {
    let total = 0;
    const rows = lvls.map(([price, qty]) => {
      total += qty;
      const bar = el("span", { class: "bar" });
      bar.style.width = `${maxQty ? Math.round((100 * qty) / maxQty) : 0}%`;
      return el("tr", { "data-side": side, "data-price": price, "data-qty": qty },
        el("td", { class: "price" }, price),
        el("td", { class: "qty" }, bar, el("span", { class: "v" }, qty)),
        el("td", { class: "total" }, total));
    });
    return rows;
  }

  function renderBook() {
    const { bids, asks } = state.book;
    const maxQty = Math.max(0, ...bids.map((l) => l[1]), ...asks.map((l) => l[1]));
    const askRows = ladderRows("ask", asks, maxQty).reverse(); // best ask next to the spread
    $("asks").tBodies[0].replaceChildren(...askRows);
    $("bids").tBodies[0].replaceChildren(...ladderRows("bid", bids, maxQty));
    if (bids.length && asks.length) {
      setText("spread", `spread ${asks[0][0] - bids[0][0]} (bid ${bids[0][0]} / ask ${asks[0][0]})`);
    } else {
      setText("spread", bids.length || asks.length ? "one-sided book" : "empty book");
    }
    drawDepth();
  }

  function drawDepth() {
    const canvas = $("depth");
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 300;
    const h = canvas.clientHeight || 160;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const css = getComputedStyle(document.body);
    const fg = css.getPropertyValue("--dim").trim() || "#888";
    const bidColor = css.getPropertyValue("--bid").trim() || "#26a69a";
    const askColor = css.getPropertyValue("--ask").trim() || "#ef5350";
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = fg;
    const { bids, asks } = state.book;
    if (!bids.length && !asks.length) {
      ctx.textAlign = "center";
      ctx.fillText("empty book", w / 2, h / 2);
      return;
    }
    const cum = (lvls) => { let t = 0; return lvls.map(([p, q]) => [p, (t += q)]); };
    const cb = cum(bids); // best (highest) first
    const ca = cum(asks); // best (lowest) first
    const prices = [...bids, ...asks].map((l) => l[0]);
    let lo = Math.min(...prices);
    let hi = Math.max(...prices);
    if (hi === lo) { lo -= 1; hi += 1; }
    const pad = (hi - lo) * 0.05;
    lo -= pad; hi += pad;
    const maxCum = Math.max(cb.length ? cb[cb.length - 1][1] : 0, ca.length ? ca[ca.length - 1][1] : 0, 1);
    const top = 14, bottom = h - 16, left = 4, right = w - 4;
    const x = (p) => left + ((p - lo) / (hi - lo)) * (right - left);
    const y = (q) => bottom - (q / maxCum) * (bottom - top);

    function area(points, color, towardLeft) {
      if (!points.length) return;
      ctx.beginPath();
      ctx.moveTo(x(points[0][0]), bottom);
      let prevY = bottom;
      for (const [p, q] of points) {
        ctx.lineTo(x(p), prevY);
        ctx.lineTo(x(p), y(q));
        prevY = y(q);
      }
      const edge = towardLeft ? left : right;
      ctx.lineTo(edge, prevY);
      ctx.lineTo(edge, bottom);
      ctx.closePath();
      ctx.globalAlpha = 0.25;
      ctx.fillStyle = color;
      ctx.fill();
      ctx.globalAlpha = 1;
      ctx.strokeStyle = color;
      ctx.lineWidth = 1.5;
      ctx.stroke();
    }
    area(cb, bidColor, true);
    area(ca, askColor, false);

    ctx.fillStyle = fg;
    ctx.textAlign = "left";
    ctx.fillText(`${Math.ceil(lo)}`, left, h - 3);
    ctx.textAlign = "right";
    ctx.fillText(`${Math.floor(hi)}`, right, h - 3);
    ctx.fillText(`cum. size ${maxCum}`, right, 11);
    if (cb.length && ca.length) {
      ctx.textAlign = "center";
      ctx.fillText(`${(bids[0][0] + asks[0][0]) / 2}`, (x(bids[0][0]) + x(asks[0][0])) / 2, h - 3);
    }
  }

  // ---- fills: tape and price chart -------------------------------------------------

  const fillKey = (f) => `${f.taker}:${f.maker}`;

  function validFill(f) {
    return f && typeof f.taker === "string" && typeof f.maker === "string" && isInt(f.price) && isInt(f.qty);
  }

  function addFill(f, final) {
    if (!validFill(f)) return;
    const key = fillKey(f);
    const seq = isInt(f.seq) ? f.seq : null;
    const side = f.taker_side === "buy" || f.taker_side === "sell" ? f.taker_side : null;
    const old = state.fills.get(key);
    if (old) {
      if (old.final && !final) return; // a final fill never changes
      old.price = f.price;
      old.qty = f.qty;
      if (seq !== null) old.seq = seq;
      if (side) old.side = side;
      if (final) old.final = true;
      return;
    }
    state.fills.set(key, {
      key, taker: f.taker, maker: f.maker, price: f.price, qty: f.qty, final: !!final, seq, side,
      arrived: ++state.arrival,
    });
    touchMine(f);
  }

  function revokeFill(f) {
    if (!validFill(f)) return;
    const old = state.fills.get(fillKey(f));
    if (old && !old.final) {
      state.fills.delete(old.key);
      state.revoked += 1;
    }
    touchMine(f);
  }

  /** Fills oldest first: final ones by seq, then provisional ones in arrival order. */
  function orderedFills() {
    const all = [...state.fills.values()];
    all.sort((a, b) => {
      if (a.final !== b.final) return a.final ? -1 : 1;
      if (a.final) return (a.seq ?? 0) - (b.seq ?? 0);
      return a.arrived - b.arrived;
    });
    if (all.length > TAPE_MAX) {
      for (const f of all.splice(0, all.length - TAPE_MAX)) state.fills.delete(f.key);
    }
    return all;
  }

  function applyFillEvent(ev) {
    if (ev.type === "fill") addFill(ev.fill, false);
    else if (ev.type === "revoked") revokeFill(ev.fill);
    else if (ev.type === "final" && Array.isArray(ev.fills)) for (const f of ev.fills) addFill(f, true);
    schedule("tape");
  }

  let chart = null;
  let series = null;

  function initChart() {
    const LWC = window.LightweightCharts;
    const box = $("price-chart");
    if (!LWC || typeof LWC.createChart !== "function") {
      box.textContent = "(the chart library did not load)";
      return;
    }
    const css = getComputedStyle(document.body);
    const label = (t) => `seq ${t - 1}`; // x is seq + 1: see renderTape
    chart = LWC.createChart(box, {
      autoSize: true,
      layout: {
        background: { color: "transparent" },
        textColor: css.getPropertyValue("--dim").trim() || "#888",
        // The logo injects a <style> element, which the page's CSP refuses; the footer
        // carries the attribution notice and the link to TradingView instead.
        attributionLogo: false,
      },
      grid: { vertLines: { visible: false }, horzLines: { color: "rgba(128,128,128,0.15)" } },
      rightPriceScale: { borderVisible: false },
      timeScale: { borderVisible: false, tickMarkFormatter: label, fixLeftEdge: true },
      localization: { timeFormatter: (t) => `fill seq ${t - 1}`, priceFormatter: (p) => String(Math.round(p)) },
      handleScroll: false,
      handleScale: false,
    });
    series = chart.addSeries(LWC.LineSeries, {
      color: css.getPropertyValue("--final").trim() || "#4c8dff",
      lineWidth: 2,
      pointMarkersVisible: true,
      priceFormat: { type: "price", precision: 0, minMove: 1 },
    });
  }

  function renderTape() {
    const fills = orderedFills();
    const provColor = getComputedStyle(document.body).getPropertyValue("--provisional").trim() || "#f0a030";
    const rows = [];
    const points = [];
    let x = 0;
    for (const f of fills) {
      // The chart's x axis is the fill's seq + 1 where known (else the next one), not time.
      x = f.seq !== null && f.seq + 1 > x ? f.seq + 1 : x + 1;
      const point = { time: x, value: f.price };
      if (!f.final) point.color = provColor;
      points.push(point);
      rows.push(el("tr", {
        class: `fill ${f.final ? "final" : "provisional"}`, "data-final": f.final ? "true" : "false",
        "data-price": f.price, "data-qty": f.qty, "data-key": f.key,
        title: f.final ? "final: never changes" : "provisional: may still be revoked",
      },
      el("td", {}, el("span", { class: `tag ${f.final ? "final" : "provisional"}` }, f.final ? "final" : "provisional")),
      el("td", { class: "dim" }, f.seq !== null ? f.seq : ""),
      el("td", { class: `price ${f.side === "buy" ? "up" : f.side === "sell" ? "down" : ""}`,
        title: f.side ? `the taker ${f.side === "buy" ? "bought" : "sold"}` : null }, f.price),
      el("td", {}, f.qty),
      el("td", { class: "mono", title: f.taker }, short(f.taker)),
      el("td", { class: "mono", title: f.maker }, short(f.maker))));
    }
    rows.reverse(); // newest first
    $("tape-body").replaceChildren(...rows);
    const prov = fills.filter((f) => !f.final).length;
    setText("tape-summary", `${fills.length} fill${fills.length === 1 ? "" : "s"} shown (${prov} provisional); ` +
      `${state.revoked} provisional fill${state.revoked === 1 ? "" : "s"} revoked since this page opened`);
    if (series) {
      series.setData(points);
      if (points.length) chart.timeScale().fitContent();
    }
  }

  async function reloadFills(gen) {
    state.buffer = [];
    try {
      const head = await getJSON("/v1/fills?since=0&limit=1");
      const since = Math.max(0, (isInt(head.total) ? head.total : 0) - TAPE_MAX);
      const page = await getJSON(`/v1/fills?since=${since}&limit=${TAPE_MAX}`);
      if (gen !== state.gen) return;
      state.fills.clear();
      for (const f of Array.isArray(page.fills) ? page.fills : []) addFill(f, f.final === true);
    } catch (err) {
      showStatusError(`could not load fills: ${err.message}`);
    } finally {
      if (gen === state.gen) {
        const held = state.buffer || [];
        state.buffer = null;
        for (const ev of held) applyFillEvent(ev);
        schedule("tape");
      }
    }
  }

  // ---- the event stream -------------------------------------------------------------

  function setConn(s, text) {
    const badge = $("conn");
    badge.dataset.state = s;
    badge.textContent = text || s;
    state.live = s === "live";
  }

  function connect() {
    const gen = ++state.gen;
    setConn("connecting");
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    let ws;
    try {
      ws = new WebSocket(`${proto}//${location.host}/v1/stream`);
    } catch (err) {
      reconnectLater(gen);
      return;
    }
    ws.onmessage = (msg) => {
      if (gen !== state.gen) return;
      let ev;
      try { ev = JSON.parse(msg.data); } catch { return; }
      if (ev && typeof ev === "object") onEvent(ev, gen);
    };
    ws.onclose = () => reconnectLater(gen);
    ws.onerror = () => { /* a close follows */ };
  }

  function reconnectLater(gen) {
    if (gen !== state.gen) return;
    state.gen += 1; // ignore anything the old socket still says
    const delay = Math.min(RECONNECT_MAX_MS, RECONNECT_MIN_MS * 2 ** state.retry);
    state.retry = Math.min(state.retry + 1, 8);
    setConn("reconnecting", `disconnected; retrying in ${Math.round(delay / 1000)} s`);
    setTimeout(connect, delay);
  }

  function onEvent(ev, gen) {
    switch (ev.type) {
      case "hello":
        state.retry = 0;
        setConn("live");
        if (typeof ev.node === "string") setText("node-id", short(ev.node));
        if (ev.book) setBook(ev.book);
        reloadFills(gen);
        break;
      case "book":
        setBook(ev);
        break;
      case "fill":
      case "revoked":
      case "final":
        if (state.buffer) state.buffer.push(ev);
        else applyFillEvent(ev);
        break;
      case "order":
        if (ev.order && typeof ev.order.id === "string" && state.mine.has(ev.order.id)) state.mineDirty = true;
        break;
      case "error":
        setConn("error", `stream: ${ev.error || "error"}: ${ev.detail || ""}`);
        break;
      default:
        break;
    }
  }

  // ---- status and peers, polled at most once a second -------------------------------

  async function getJSON(path) {
    const r = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
    let data = null;
    try { data = await r.json(); } catch { data = null; }
    if (!r.ok) {
      const e = new Error(`${(data && data.error) || `HTTP ${r.status}`}: ${(data && data.detail) || r.statusText}`);
      e.status = r.status;
      e.retryAfter = Number(r.headers.get("Retry-After")) || 0;
      throw e;
    }
    return data;
  }

  function showStatusError(text) { setText("status-msg", text); }

  function fmtMs(v) { return v === null || v === undefined ? "—" : `${Math.round(v * 10) / 10} ms`; }

  function renderStatus(st) {
    setText("node-name", typeof st.name === "string" ? st.name : "");
    setText("node-id", short(st.node_id));
    document.title = `p2pex ${typeof st.name === "string" ? st.name : ""} (${short(st.node_id)})`;
    const hash = typeof st.state_hash === "string" ? st.state_hash : "";
    setText("state-hash", hash);
    $("state-hash").title = "the digest of every entry this node holds; equal on replicas that hold the same entries";
    const ready = $("ready");
    const fin = st.finality || {};
    const role = typeof fin.role === "string" ? fin.role : (fin.member === false ? "not member" : "member");
    const rs = st.ready ? `ready, ${role}` : "not ready";
    ready.dataset.state = st.ready ? "ready" : "not-ready";
    ready.textContent = rs;

    const rep = st.replication || {};
    const counts = st.counts || {};
    const stats = [
      ["replication latency p50 / p99", `${fmtMs(rep.latency_p50_ms)} / ${fmtMs(rep.latency_p99_ms)}`,
        `acceptance at another node to visible here (${num(rep.latency_samples)} samples)`],
      ["finality p50 / p99", `${fmtMs(rep.final_p50_ms)} / ${fmtMs(rep.final_p99_ms)}`,
        `acceptance here to final (${num(rep.final_samples)} samples)`],
      ["finality lag", fin.pending ? fmtMs(fin.lag_ms) : "nothing pending", "how far the final frontier trails"],
      ["final up to", fin.frontier_ms ? new Date(fin.frontier_ms).toISOString().replace("T", " ").slice(0, 23) : "—",
        "the final frontier"],
      ["members", Array.isArray(fin.members) ? String(fin.members.length) : "—", ""],
      ["entries pushed / pulled", `${num(rep.pushed)} / ${num(rep.pulled)}`, ""],
      ["push / pull failures", `${num(rep.push_failures)} / ${num(rep.pull_failures)}`, ""],
      ["fills final / provisional", `${num(counts.final_fills)} / ${num(counts.provisional_fills)}`, ""],
      ["resting orders", num(counts.resting), ""],
    ];
    $("replication").replaceChildren(...stats.flatMap(([k, v, t]) => [
      el("dt", { title: t || null }, k), el("dd", { title: t || null }, v)]));

    const peers = Array.isArray(st.peers) ? st.peers : [];
    const rows = peers.map((p) => el("tr", { "data-id": p.id, "data-state": p.state },
      el("td", { class: "mono", title: p.id }, p.short || short(p.id)),
      el("td", { class: "mono" }, p.url || ""),
      el("td", {}, el("span", { class: "badge", "data-state": p.state }, p.state)),
      el("td", {}, num(p.rtt_ms)),
      el("td", {}, num(p.behind_entries)),
      el("td", {}, `${num(p.latency_p50_ms)} / ${num(p.latency_p99_ms)}`),
      el("td", {}, p.last_ok_s_ago === null || p.last_ok_s_ago === undefined ? "never" : `${p.last_ok_s_ago} s ago`),
      el("td", {}, num(p.clock_offset_ms)),
      el("td", {}, num(p.failures)),
      el("td", { class: "error" }, p.last_error || "")));
    if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 10, class: "dim" }, "no peers")));
    $("peers").tBodies[0].replaceChildren(...rows);
  }

  async function pollStatus() {
    let wait = STATUS_EVERY_MS;
    try {
      const st = await getJSON("/v1/status");
      state.status = st;
      renderStatus(st);
      showStatusError("");
    } catch (err) {
      showStatusError(`status: ${err.message}`);
      if (err.retryAfter) wait = Math.max(wait, err.retryAfter * 1000);
    }
    const frontier = state.status && state.status.finality ? state.status.finality.frontier : null;
    const moved = frontier !== state.frontier;
    state.frontier = frontier;
    if (state.mineDirty || moved) await refreshMine(moved);
    setTimeout(pollStatus, document.hidden ? Math.max(wait, HIDDEN_EVERY_MS) : wait);
  }

  // ---- token, orders and cancels --------------------------------------------------------

  function token() {
    try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch { return ""; }
  }

  function renderToken() {
    setText("token-state", token() ? "token set (kept in this tab only)" : "no token: placing and cancelling need it");
  }

  async function api(method, path, body) {
    const t = token();
    if (!t) throw new Error("no token: enter the node's API token (the .cookie file in its data dir)");
    const headers = { Accept: "application/json", Authorization: `Bearer ${t}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, {
      method, headers, cache: "no-store", body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = null;
    try { data = await r.json(); } catch { data = null; }
    if (!r.ok) {
      const code = (data && typeof data.error === "string") ? data.error : `HTTP ${r.status}`;
      const detail = (data && typeof data.detail === "string") ? data.detail : r.statusText;
      throw new Error(`${code}: ${detail}`);
    }
    return data;
  }

  function say(text, kind) {
    const m = $("order-msg");
    m.textContent = text;
    m.dataset.kind = kind || "info";
  }

  function remember(view) {
    if (!view || typeof view.id !== "string") return;
    const old = state.mine.get(view.id) || {};
    state.mine.set(view.id, { ...old, ...view }); // a known order keeps its place: oldest first
    while (state.mine.size > MINE_KEPT) state.mine.delete(state.mine.keys().next().value);
    renderMine();
  }

  function touchMine(f) {
    if (state.mine.has(f.taker) || state.mine.has(f.maker)) state.mineDirty = true;
  }

  /** Refresh this tab's orders at a status tick: all unsettled ones after a fill
   *  touched one of them, the ones not final yet when the final frontier moved. */
  async function refreshMine(frontierMoved) {
    const dirty = state.mineDirty;
    state.mineDirty = false;
    const ids = [...state.mine.keys()].slice(-MINE_REFRESHED);
    for (const id of ids) {
      const view = state.mine.get(id);
      if (!view || (view.final && !ORDER_STATES_LIVE.has(view.status))) continue; // settled for good
      if (!dirty && !(frontierMoved && !view.final)) continue;
      try {
        remember(await getJSON(`/v1/orders/${encodeURIComponent(id)}`));
      } catch {
        state.mineDirty = true; // try again on the next tick
      }
    }
  }

  function renderMine() {
    const rows = [...state.mine.values()].reverse().map((o) => {
      const live = ORDER_STATES_LIVE.has(o.status);
      const button = el("button", { type: "button", class: "cancel", "data-id": o.id, disabled: !live }, "cancel");
      button.addEventListener("click", () => cancel(o.id));
      return el("tr", { "data-id": o.id, "data-status": o.status, "data-final": o.final ? "true" : "false" },
        el("td", { class: "mono", title: o.id }, short(o.id)),
        el("td", { class: o.side === "buy" ? "up" : "down" }, o.side || ""),
        el("td", {}, o.price ? o.price : "market"),
        el("td", {}, num(o.qty)),
        el("td", {}, num(o.filled)),
        el("td", { class: "status" }, o.status || ""),
        el("td", {}, el("span", { class: `tag ${o.final ? "final" : "provisional"}` }, o.final ? "final" : "provisional")),
        el("td", {}, button));
    });
    $("my-orders").tBodies[0].replaceChildren(...rows);
  }

  async function placeOrder(ev) {
    ev.preventDefault();
    const side = $("order-side").value;
    const qtyText = $("order-qty").value.trim();
    const priceText = $("order-price").value.trim();
    if (!/^[0-9]+$/.test(qtyText)) { say("qty must be a whole number", "error"); return; }
    if (priceText && !/^[0-9]+$/.test(priceText)) { say("price must be a whole number (or empty: market)", "error"); return; }
    const body = { side, qty: Number(qtyText) };
    if (priceText) {
      body.price = Number(priceText);
      body.tif = $("order-tif").value;
    }
    const button = $("order-submit");
    button.disabled = true;
    say("placing …");
    try {
      const view = await api("POST", "/v1/orders", body);
      remember(view);
      const fills = Array.isArray(view.fills) ? view.fills.length : 0;
      say(`order ${view.id} ${view.status}` + (fills ? ` with ${fills} fill${fills === 1 ? "" : "s"}` : ""), "ok");
      $("order-msg").dataset.orderId = view.id;
      state.mineDirty = true;
    } catch (err) {
      say(`not placed: ${err.message}`, "error");
    } finally {
      button.disabled = false;
    }
  }

  async function cancel(id) {
    if (!/^[0-9a-f]{64}$/.test(id)) { say("an order id is 64 hex characters", "error"); return; }
    say(`cancelling ${short(id)} …`);
    try {
      const view = await api("DELETE", `/v1/orders/${id}`);
      remember(view);
      say(`order ${view.id} ${view.status}`, "ok");
    } catch (err) {
      say(`not cancelled: ${err.message}`, "error");
    }
  }

  // ---- start ------------------------------------------------------------------------------

  function start() {
    $("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const t = $("token").value.trim();
      try {
        if (t) sessionStorage.setItem(TOKEN_KEY, t);
      } catch {
        say("this browser keeps no sessionStorage here; the token cannot be kept", "error");
      }
      $("token").value = "";
      renderToken();
    });
    $("token-clear").addEventListener("click", () => {
      try { sessionStorage.removeItem(TOKEN_KEY); } catch { /* nothing kept */ }
      $("token").value = "";
      renderToken();
    });
    $("order-form").addEventListener("submit", placeOrder);
    $("cancel-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      cancel($("cancel-id").value.trim().toLowerCase());
    });
    window.addEventListener("resize", () => schedule("book"));
    renderToken();
    renderMine();
    initChart();
    schedule("book");
    schedule("tape");
    connect();
    pollStatus();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
