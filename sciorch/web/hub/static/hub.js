// Live state for the entries and entry pages: one EventSource on /hub/live/entries (the
// server pushes transitions and log growth from the engine's bus; nothing here polls).
(function () {
  "use strict";
  var table = document.getElementById("entries");
  var entry = document.getElementById("entry");
  var status = document.getElementById("live");
  var url;
  if (entry) {
    url = "/hub/live/entries?entry=" + encodeURIComponent(entry.dataset.entry) +
      "&log=" + encodeURIComponent(entry.dataset.log);
  } else if (table) {
    url = "/hub/live/entries" + (table.dataset.event ? "?event=" + encodeURIComponent(table.dataset.event) : "");
  } else {
    return;
  }
  var source = new EventSource(url);
  source.onopen = function () { if (status) status.textContent = "live"; };
  source.onerror = function () { if (status) status.textContent = "reconnecting…"; };
  function setState(el, state) {
    el.textContent = state;
    el.className = "st s-" + state;
  }
  source.addEventListener("entry", function (ev) {
    var e = JSON.parse(ev.data);
    if (entry) {
      setState(document.getElementById("state"), e.state);
      document.getElementById("reason").textContent = e.reason || "";
      document.getElementById("exit-code").textContent = e.exit_code === null ? "" : e.exit_code;
      var open = document.getElementById("open-url");
      if (e.access_url && e.state === "ready") { open.href = e.access_url; open.hidden = false; }
      else { open.hidden = true; }
      var list = document.getElementById("transitions");
      list.textContent = "";
      e.transitions.forEach(function (t) {
        var li = document.createElement("li");
        var s = document.createElement("span");
        setState(s, t.state);
        li.appendChild(s);
        li.appendChild(document.createTextNode(" " + t.at.substr(11, 8) + (t.reason ? " · " + t.reason : "")));
        list.appendChild(li);
      });
      var terminal = ["succeeded", "failed", "cancelled", "expired"].indexOf(e.state) >= 0;
      var cancel = document.getElementById("cancel-form");
      if (terminal && cancel) cancel.hidden = true;
      if (terminal && entry.dataset.final !== "true") {
        // once, at the end: the result and the files, rendered by the server as on a load
        entry.dataset.final = "true";
        fetch(location.href, { credentials: "same-origin" }).then(function (r) { return r.text(); })
          .then(function (html) {
            var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("outputs");
            if (fresh) document.getElementById("outputs").replaceWith(fresh);
          });
      }
      entry.dataset.state = e.state;
    } else {
      var row = document.getElementById("e-" + e.id);
      if (row) setState(row.children[2], e.state);
      else if (table.dataset.last === "true") addRow(e);
    }
  });
  // A new entry (the server sends only those the caller may see) goes at the end, where the
  // oldest-first list the server renders would have it (on its last page).
  function addRow(e) {
    var empty = document.getElementById("no-entries");
    if (empty) empty.remove();
    var tr = document.createElement("tr");
    tr.id = "e-" + e.id;
    var cells = ["", e.service, "", e.site, e.submitted_by,
      e.created_at.substr(5, 5) + " " + e.created_at.substr(11, 5)];
    cells.forEach(function (text) {
      var td = document.createElement("td"); td.textContent = text; tr.appendChild(td);
    });
    var a = document.createElement("a");
    a.href = "/hub/entries/" + e.id; a.textContent = e.id;
    tr.children[0].appendChild(a);
    setState(tr.children[2], e.state);
    table.tBodies[0].appendChild(tr);
  }
  source.addEventListener("log", function (ev) {
    var chunk = JSON.parse(ev.data);
    var pre = document.getElementById("logs");
    var follow = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.appendChild(document.createTextNode(chunk.data));
    entry.dataset.log = chunk.next_offset;
    if (follow) pre.scrollTop = pre.scrollHeight;
  });
  source.addEventListener("refused", function () { source.close(); });
})();
