// orderflow console: live updates over Server-Sent Events.
// Every value shown comes from the server and may be anything a user typed, so the
// DOM is built with createElement and textContent only: never innerHTML.
"use strict";

(function () {
  const LIVE_PAGES = new Set(["orders", "flow", "dead-letters", "inbox"]);

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

  function renderFlow(snap) {
    const root = document.getElementById("flow");
    if (!root || !Array.isArray(snap.flow)) return;
    root.replaceChildren(...snap.flow.map(streamCard));
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
    if (version !== null) notice.hidden = version === notice.dataset.version;
  }

  function render(snap) {
    renderBadges(snap);
    renderOrders(snap);
    renderFlow(snap);
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
