// orderflow console: live updates over Server-Sent Events.
// Every value shown comes from the server and may be anything a user typed, so the
// DOM is built with createElement and textContent only: never innerHTML.
"use strict";

(function () {
  const LIVE_PAGES = new Set(["orders", "flow", "dead-letters", "inbox", "events"]);

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function duration(ms) {
    if (ms === null || ms === undefined) return "—";
    if (ms < 1000) return Math.round(ms) + " ms";
    if (ms < 60000) return (ms / 1000).toFixed(1) + " s";
    if (ms < 3600000) return Math.round(ms / 60000) + " min";
    return (ms / 3600000).toFixed(1) + " h";
  }

  function size(bytes) {
    if (bytes === null || bytes === undefined) return "—";
    let value = bytes;
    for (const unit of ["B", "KiB", "MiB"]) {
      if (value < 1024) return unit === "B" ? Math.round(value) + " B" : value.toFixed(1) + " " + unit;
      value /= 1024;
    }
    return value.toFixed(1) + " GiB";
  }

  function when(iso) {
    if (!iso) return "—";
    const date = new Date(iso);
    if (isNaN(date.getTime())) return String(iso);
    return date.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }

  function items(list) {
    if (!Array.isArray(list)) return "";
    return list.map((item) => (item.quantity ?? 1) + " × " + (item.name ?? "")).join(", ");
  }

  function setStatus(state, text) {
    const node = document.getElementById("live-status");
    if (!node) return;
    node.dataset.state = state;
    node.textContent = text;
  }

  function renderBadges(snap) {
    const dead = document.getElementById("badge-dead-letters");
    if (dead && snap.dead_letters) {
      let total = 0;
      for (const info of Object.values(snap.dead_letters)) total += Number(info.count) || 0;
      dead.textContent = total ? String(total) : "";
    }
    const inbox = document.getElementById("badge-inbox");
    if (inbox && snap.inbox) inbox.textContent = snap.inbox.count ? String(snap.inbox.count) : "";
  }

  function journeyCell(id) {
    const cell = el("td");
    const link = el("a", "journey-link", id);
    link.href = "/journey/" + encodeURIComponent(String(id));
    link.title = "the order's journey";
    cell.append(link);
    return cell;
  }

  function orderRow(order, placed) {
    const row = el("tr");
    row.dataset.orderId = String(order.id);
    if (placed && String(order.id) === placed) row.className = "placed";
    row.append(
      journeyCell(order.id),
      el("td", "email", order.email),
      el("td", "num", order.total + " " + order.currency),
      el("td", "items", items(order.items)),
      el("td", "", when(order.created_at)),
    );
    const cell = el("td");
    const status = el("span", "status status-" + String(order.email_status), order.email_status);
    status.dataset.status = String(order.email_status);
    cell.append(status);
    if (order.email_status === "sent" && order.email_message_id) {
      const link = el("a", "mail-link", "open email");
      link.href = "/inbox/find?message_id=" + encodeURIComponent(order.email_message_id);
      cell.append(" ", link);
    }
    if (order.email_status === "failed" && order.email_reason) {
      cell.append(" ", el("span", "reason", order.email_reason));
    }
    row.append(cell);
    return row;
  }

  function renderOrders(snap) {
    const body = document.getElementById("orders-body");
    if (!body || !Array.isArray(snap.orders)) return;
    const placed = body.dataset.placed || "";
    if (snap.orders.length === 0) {
      const row = el("tr", "empty");
      const cell = el("td", "", "No orders yet.");
      cell.colSpan = 6;
      row.append(cell);
      body.replaceChildren(row);
      return;
    }
    body.replaceChildren(...snap.orders.map((order) => orderRow(order, placed)));
  }

  function figure(label, value, className) {
    const box = el("div");
    box.append(el("dt", "", label), el("dd", className || "", value));
    return box;
  }

  function groupRow(group) {
    const row = el("tr");
    row.dataset.group = String(group.name);
    let lag = group.lag === null || group.lag === undefined ? "?" : String(group.lag);
    if (group.lag_source !== "redis" && group.lag_source !== "counted") lag += " (" + group.lag_source + ")";
    const consumers = el("td");
    if (!group.consumers || group.consumers.length === 0) consumers.append(el("small", "", "none"));
    for (const consumer of group.consumers || []) {
      const span = el("span", "consumer", consumer.name + " ");
      span.append(el("small", "", "pending " + consumer.pending + " · idle " + duration(consumer.idle_ms)));
      consumers.append(span);
    }
    row.append(
      el("td", "", group.name),
      el("td", "num pending", group.pending),
      el("td", "num lag", lag),
      el("td", "num", duration(group.oldest_pending_age_ms)),
      el("td", "num", duration(group.oldest_pending_idle_ms)),
      el("td", "num", group.oldest_pending_deliveries ?? "—"),
      consumers,
    );
    return row;
  }

  function streamCard(stream) {
    const card = el("section", "card stream");
    card.dataset.stream = String(stream.name);
    const title = el("h2", "", stream.name);
    if (!stream.exists) title.append(" ", el("small", "", "(no such stream yet)"));
    const figures = el("dl", "figures");
    figures.append(
      figure("Length", stream.length, "length"),
      figure("Rate", stream.rate_per_s === null || stream.rate_per_s === undefined ? "—" : stream.rate_per_s + "/s", "rate"),
      figure("Added", stream.entries_added ?? "—"),
      figure("Memory", size(stream.memory_bytes)),
      figure("Last id", stream.last_entry_id || "—"),
      figure("Dead letters", stream.dead_letters, "dead"),
    );
    card.append(title, figures);
    if (stream.groups && stream.groups.length) {
      const table = el("table", "groups");
      const head = el("thead");
      const headRow = el("tr");
      for (const name of ["Group", "Pending", "Lag", "Oldest pending age", "Oldest idle", "Deliveries", "Consumers"]) {
        headRow.append(el("th", "", name));
      }
      head.append(headRow);
      const body = el("tbody");
      body.append(...stream.groups.map(groupRow));
      table.append(head, body);
      card.append(table);
    } else {
      card.append(el("p", "muted", "No consumer groups."));
    }
    return card;
  }

  // -- Flow charts: the last minutes of rate, lag and pending, drawn as inline SVG ---------
  // The history is kept by the page (and in sessionStorage, so a reload keeps it): each
  // snapshot the live stream brings adds a point.
  const HISTORY_KEY = "orderflow.flow.history";
  const WINDOW_MS = 5 * 60 * 1000;
  const SVG = "http://www.w3.org/2000/svg";
  let history = loadHistory();

  function loadHistory() {
    try {
      const saved = JSON.parse(window.sessionStorage.getItem(HISTORY_KEY) || "[]");
      return Array.isArray(saved) ? saved : [];
    } catch (error) {
      return [];
    }
  }

  function recordFlow(snap) {
    if (!Array.isArray(snap.flow)) return;
    const t = Number(snap.at) * 1000 || Date.now();
    const point = { t: t, streams: {} };
    for (const stream of snap.flow) {
      const groups = {};
      for (const group of stream.groups || []) {
        groups[group.name] = { lag: group.lag ?? null, pending: group.pending ?? null };
      }
      point.streams[stream.name] = { rate: stream.rate_per_s ?? null, groups: groups };
    }
    history.push(point);
    history = history.filter((p) => p.t >= t - WINDOW_MS);
    try {
      window.sessionStorage.setItem(HISTORY_KEY, JSON.stringify(history));
    } catch (error) {
      // storage full or disabled: the page keeps its history in memory only
    }
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    return node;
  }

  // One chart: a polyline per series over the last WINDOW_MS, y from 0 to the maximum.
  function chart(title, kind, series) {
    const width = 300, height = 90, pad = 4;
    const box = el("figure", "chart");
    box.dataset.chart = kind;
    const now = history.length ? history[history.length - 1].t : Date.now();
    // The x axis spans the history kept (up to WINDOW_MS), so a fresh page fills it too.
    const span = Math.max(history.length ? now - history[0].t : 0, 10000);
    let max = 0;
    for (const one of series) for (const [, v] of one.points) max = Math.max(max, v);
    const top = max > 0 ? max : 1;
    const drawing = svg("svg", { viewBox: "0 0 " + width + " " + height, width: width, height: height, role: "img" });
    drawing.append(svg("line", { x1: 0, y1: height - pad, x2: width, y2: height - pad, class: "axis" }));
    const label = el("figcaption", "", title);
    const legend = el("span", "legend");
    series.forEach((one, index) => {
      const coords = one.points.map(([t, v]) => {
        const x = width - ((now - t) / span) * width;
        const y = height - pad - (v / top) * (height - 2 * pad);
        return x.toFixed(1) + "," + y.toFixed(1);
      });
      const line = svg("polyline", { points: coords.join(" "), class: "series series-" + (index % 6) });
      line.dataset.series = one.name;
      line.dataset.samples = String(one.points.length);
      line.dataset.last = one.points.length ? String(one.points[one.points.length - 1][1]) : "";
      drawing.append(line);
      if (series.length > 1 || one.name) {
        const swatch = el("span", "swatch series-" + (index % 6), one.name);
        legend.append(swatch);
      }
    });
    const scale = svg("text", { x: 2, y: 11, class: "scale" });
    scale.textContent = "max " + (Math.round(max * 100) / 100);
    drawing.append(scale);
    label.append(" ", legend);
    box.append(drawing, label);
    return box;
  }

  function pointsOf(pick) {
    const points = [];
    for (const point of history) {
      const value = pick(point);
      if (typeof value === "number" && isFinite(value)) points.push([point.t, value]);
    }
    return points;
  }

  function charts(stream) {
    const name = String(stream.name);
    const groups = (stream.groups || []).map((group) => String(group.name));
    const perGroup = (field) =>
      groups.map((group) => ({
        name: group,
        points: pointsOf((p) => p.streams[name]?.groups?.[group]?.[field]),
      }));
    const row = el("div", "charts");
    row.append(
      chart("Rate (entries/s)", "rate", [{ name: "", points: pointsOf((p) => p.streams[name]?.rate) }]),
      chart("Lag", "lag", perGroup("lag")),
      chart("Pending", "pending", perGroup("pending")),
    );
    return row;
  }

  function renderFlow(snap) {
    const root = document.getElementById("flow");
    if (!root || !Array.isArray(snap.flow)) return;
    recordFlow(snap);
    root.replaceChildren(
      ...snap.flow.map((stream) => {
        const card = streamCard(stream);
        card.querySelector("dl.figures").after(charts(stream));
        return card;
      }),
    );
  }

  // -- Dead letters and Inbox: the table re-rendered when the server says it changed ------
  // The page is fetched again and its <main> swapped in (parsed by DOMParser, where no
  // script runs; the markup is the server's, escaped). Not while the operator is
  // mid-selection: then the notice says the page is stale.
  let refreshing = false;

  function busy() {
    return document.querySelector("main input[type=checkbox]:checked, main details[open]") !== null;
  }

  async function refreshMain(notice) {
    refreshing = true;
    try {
      // With the query: it carries the notice of the action that led here (replayed,
      // purged), which must survive the re-render.
      const url = window.location.pathname + window.location.search;
      const response = await fetch(url, { headers: { accept: "text/html" } });
      if (!response.ok) return;
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = page.querySelector("main");
      const main = document.querySelector("main");
      if (!fresh || !main) return;
      main.replaceChildren(...Array.from(fresh.childNodes).map((node) => document.importNode(node, true)));
    } catch (error) {
      notice.hidden = false; // could not refresh: say the page is stale instead
    } finally {
      refreshing = false;
    }
  }

  function renderEventCounts(snap) {
    // The Events page's counts: each stream's length and dead letters, from the tick.
    if (!Array.isArray(snap.flow)) return;
    for (const stream of snap.flow) {
      for (const node of document.querySelectorAll("[data-count-stream]")) {
        if (node.dataset.countStream === stream.name) node.textContent = String(stream.length);
      }
      for (const node of document.querySelectorAll("[data-count-dead]")) {
        if (node.dataset.countDead === stream.name) node.textContent = String(stream.dead_letters);
      }
    }
  }

  function renderNotice(snap) {
    const notice = document.getElementById("live-notice");
    if (!notice) return;
    let version = null;
    if (notice.dataset.section === "dead_letters" && snap.dead_letters) {
      version = Object.entries(snap.dead_letters)
        .map(([name, info]) => name + ":" + info.count + ":" + info.newest)
        .join(";");
    } else if (notice.dataset.section === "inbox" && snap.inbox) {
      version = snap.inbox.count + ":" + snap.inbox.newest;
    }
    if (version === null || version === notice.dataset.version) {
      notice.hidden = true;
      return;
    }
    if (busy()) notice.hidden = false;
    else if (!refreshing) refreshMain(notice);
  }

  function render(snap) {
    renderBadges(snap);
    renderOrders(snap);
    renderFlow(snap);
    renderEventCounts(snap);
    renderNotice(snap);
    const problem = snap.redis_error || snap.orders_error;
    if (problem) setStatus("degraded", "live · " + problem);
    else setStatus("live", "live");
  }

  function connect() {
    if (!window.EventSource) return;
    const source = new EventSource("/console/events");
    source.addEventListener("snapshot", (event) => {
      let snap;
      try {
        snap = JSON.parse(event.data);
      } catch (error) {
        return; // a malformed tick is skipped; the next one carries everything again
      }
      if (snap && typeof snap === "object") render(snap);
    });
    source.addEventListener("problem", (event) => {
      try {
        setStatus("degraded", "paused · " + JSON.parse(event.data).message);
      } catch (error) {
        setStatus("degraded", "paused");
      }
    });
    source.addEventListener("error", () => {
      // The server ends each stream after a few seconds; the browser reconnects.
      setStatus(source.readyState === EventSource.CLOSED ? "off" : "reconnecting",
        source.readyState === EventSource.CLOSED ? "offline" : "reconnecting…");
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (LIVE_PAGES.has(document.body.dataset.page || "")) connect();
  });
})();
