// The campaign page: each evaluation's value, the best so far and the posterior at its
// predicted best (mean and 2 std either side, after each summary), drawn with uPlot (vendored,
// MIT) and redrawn as the server pushes the campaign's changes (/hub/live/campaigns/{id}).
(function () {
  "use strict";
  var box = document.getElementById("campaign");
  var chartEl = document.getElementById("chart");
  var tbody = document.querySelector("#points tbody");
  var plot = null;
  function size() { return { width: Math.max(280, chartEl.clientWidth || 600), height: 300 }; }
  // x: the evaluation's seq; the posterior after n measurements is drawn at x = n - 1, beside
  // the measurement that made it. uPlot wants one x array, so both are merged, null-padded.
  function draw(points, posterior) {
    var done = points.filter(function (p) { return p.value !== null; });
    var trace = (posterior && posterior.trace) || [];
    var rows = {};
    function row(x) { return rows[x] || (rows[x] = { value: null, best: null, mean: null, lo: null, hi: null }); }
    done.forEach(function (p) { var r = row(p.seq); r.value = p.value; r.best = p.best; });
    trace.forEach(function (t) {
      var r = row(t.n - 1); r.mean = t.mean; r.lo = t.mean - 2 * t.std; r.hi = t.mean + 2 * t.std;
    });
    var xs = Object.keys(rows).map(Number).sort(function (a, b) { return a - b; });
    function col(k) { return xs.map(function (x) { return rows[x][k]; }); }
    var data = [xs, col("value"), col("best"), col("mean"), col("lo"), col("hi")];
    if (!plot) {
      var s = size();
      var band = { stroke: "#9333ea", width: 1, dash: [4, 4], spanGaps: true };
      plot = new uPlot({
        width: s.width, height: s.height,
        scales: { x: { time: false } },
        axes: [{ label: "evaluation" }, { label: "objective" }],
        series: [
          { label: "evaluation" },
          { label: "value", stroke: "#2563eb", width: 0, points: { show: true, size: 7, fill: "#2563eb" } },
          { label: "best so far", stroke: "#16a34a", width: 2, spanGaps: true },
          { label: "posterior at its best (mean)", stroke: "#9333ea", width: 2, spanGaps: true },
          Object.assign({ label: "mean - 2 std" }, band),
          Object.assign({ label: "mean + 2 std" }, band)
        ]
      }, data, chartEl);
      window.addEventListener("resize", function () { plot.setSize(size()); });
    } else {
      plot.setData(data);
    }
    chartEl.dataset.points = String(done.length);
    chartEl.dataset.posterior = String(trace.length);
  }
  function table(points) {
    tbody.textContent = "";
    points.forEach(function (p) {
      var tr = document.createElement("tr");
      var point = Object.keys(p.point).map(function (k) {
        var v = p.point[k];
        return k + "=" + (typeof v === "number" ? v.toPrecision(4) : v);
      }).join(", ");
      tr.id = "pt-" + p.point_id;
      tr.dataset.state = p.state;
      [String(p.seq), point, p.source, p.state, p.value === null ? "" : p.value.toPrecision(6)].forEach(function (t) {
        var td = document.createElement("td"); td.textContent = t; tr.appendChild(td);
      });
      var td = document.createElement("td");
      if (p.entry_id) {
        var a = document.createElement("a");
        a.href = "/hub/entries/" + p.entry_id; a.textContent = p.entry_id; td.appendChild(a);
      }
      tr.appendChild(td);
      tbody.appendChild(tr);
    });
  }
  var source = new EventSource("/hub/live/campaigns/" + encodeURIComponent(box.dataset.campaign));
  source.addEventListener("campaign", function (ev) {
    var c = JSON.parse(ev.data);
    document.getElementById("c-state").textContent = c.state + (c.paused ? " (paused)" : "");
    document.getElementById("c-progress").textContent = c.progress.done + " / " + c.progress.budget;
    document.getElementById("c-best").textContent = c.best ? c.best.value.toPrecision(6) : "none yet";
    document.getElementById("c-std").textContent = c.posterior ? c.posterior.max_std.toPrecision(4) : "";
    draw(c.points, c.posterior);
    table(c.points);
    pending(c.points);
    actions(c.actions);
  });
  // The steering forms (shown to those who may steer): what may be rejected follows the table.
  var PENDING = ["asked", "submitted", "queued"];
  function pending(points) {
    var reject = document.getElementById("reject-point");  // a form may have been replaced
    if (!reject) return;
    var chosen = reject.value;
    reject.textContent = "";
    points.filter(function (p) { return PENDING.indexOf(p.state) >= 0; }).forEach(function (p) {
      var o = document.createElement("option");
      o.value = p.point_id;
      o.textContent = p.point_id + " · " + p.state + " · " + Object.keys(p.point).map(function (k) {
        return k + "=" + p.point[k];
      }).join(", ");
      o.selected = p.point_id === chosen;
      reject.appendChild(o);
    });
  }
  var log = document.getElementById("actions");
  function actions(list) {
    if (!log || !list) return;
    log.textContent = "";
    list.forEach(function (a) {
      var li = document.createElement("li");
      var who = document.createElement("span");
      who.className = "who"; who.textContent = a.principal;
      li.appendChild(who);
      li.appendChild(document.createTextNode(" " + a.action + " " + a.at.substr(11, 8) + (a.text ? ": " + a.text : "")));
      log.appendChild(li);
    });
  }
  source.addEventListener("refused", function () { source.close(); });
  // The steering forms post in the background and the page stays: the change comes back over
  // the stream above; the server's answer (the page it redirects to, or the page with its
  // error beside the field) supplies the fresh form. Without scripts they post as forms do.
  var said = document.getElementById("steer-status");
  function enhance(form) {
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var body = new URLSearchParams(new FormData(form));
      fetch(form.action, { method: "POST", body: body, credentials: "same-origin" })
        .then(function (r) { return r.text().then(function (html) { return { ok: r.ok, html: html }; }); })
        .then(function (got) {
          var doc = new DOMParser().parseFromString(got.html, "text/html");
          var fresh = doc.getElementById(form.id);
          if (fresh) {
            form.replaceWith(fresh);
            enhance(fresh);
            var bad = fresh.querySelector("[aria-invalid=true]");
            if (bad) bad.focus();
          }
          if (said) {
            var error = got.ok ? null : doc.querySelector("main .error");
            said.textContent = got.ok ? "done" : (error ? error.textContent : "refused");
          }
        })
        .catch(function () { if (said) said.textContent = "could not reach the server"; });
    });
  }
  document.querySelectorAll("form.steering").forEach(enhance);
})();
