// The campaign page: each evaluation's value and the best so far, drawn with uPlot (vendored,
// MIT) and redrawn as the server pushes the campaign's changes (/hub/live/campaigns/{id}).
(function () {
  "use strict";
  var box = document.getElementById("campaign");
  var chartEl = document.getElementById("chart");
  var tbody = document.querySelector("#points tbody");
  var plot = null;
  function size() { return { width: Math.max(280, chartEl.clientWidth || 600), height: 300 }; }
  function draw(points) {
    var done = points.filter(function (p) { return p.value !== null; });
    var data = [
      done.map(function (p) { return p.seq; }),
      done.map(function (p) { return p.value; }),
      done.map(function (p) { return p.best; })
    ];
    if (!plot) {
      var s = size();
      plot = new uPlot({
        width: s.width, height: s.height,
        scales: { x: { time: false } },
        axes: [{ label: "evaluation" }, { label: "objective" }],
        series: [
          { label: "evaluation" },
          { label: "value", stroke: "#2563eb", width: 0, points: { show: true, size: 7, fill: "#2563eb" } },
          { label: "best so far", stroke: "#16a34a", width: 2 }
        ]
      }, data, chartEl);
      window.addEventListener("resize", function () { plot.setSize(size()); });
    } else {
      plot.setData(data);
    }
    chartEl.dataset.points = String(done.length);
  }
  function table(points) {
    tbody.textContent = "";
    points.forEach(function (p) {
      var tr = document.createElement("tr");
      var point = Object.keys(p.point).map(function (k) {
        var v = p.point[k];
        return k + "=" + (typeof v === "number" ? v.toPrecision(4) : v);
      }).join(", ");
      [String(p.seq), point, p.state, p.value === null ? "" : p.value.toPrecision(6)].forEach(function (t) {
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
    draw(c.points);
    table(c.points);
  });
  source.addEventListener("refused", function () { source.close(); });
})();
