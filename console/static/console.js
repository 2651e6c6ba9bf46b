// The overview's live part: server-sent events replace the live section and extend the charts.
(function () {
  "use strict";
  const live = document.getElementById("live");
  if (!live) { return; }
  const palette = ["#1e3a5f", "#d9822b", "#176f2c", "#8e44ad", "#b00020", "#16a085"];
  const charts = {};

  function makeChart(id, key) {
    const canvas = document.getElementById(id);
    if (!canvas || typeof Chart === "undefined") { return; }
    charts[key] = new Chart(canvas, {
      type: "line",
      data: { labels: [], datasets: [] },
      options: { animation: false, responsive: true, spanGaps: true,
                 elements: { point: { radius: 0 } },
                 scales: { x: { ticks: { maxTicksLimit: 8 } }, y: { beginAtZero: true } } },
    });
  }

  function addSample(sample) {
    const label = new Date(sample.t).toLocaleTimeString();
    for (const key of Object.keys(charts)) {
      const chart = charts[key];
      const values = sample[key] || {};
      chart.data.labels.push(label);
      for (const domain of Object.keys(values)) {
        let set = chart.data.datasets.find((d) => d.label === domain);
        if (!set) {
          const color = palette[chart.data.datasets.length % palette.length];
          set = { label: domain, data: new Array(chart.data.labels.length - 1).fill(null),
                  borderColor: color, backgroundColor: color };
          chart.data.datasets.push(set);
        }
        set.data.push(values[domain]);
      }
      // The last hour at one sample a second.
      while (chart.data.labels.length > 3600) {
        chart.data.labels.shift();
        chart.data.datasets.forEach((d) => d.data.shift());
      }
    }
  }

  function redraw() { Object.values(charts).forEach((c) => c.update("none")); }

  makeChart("chart-lag", "lag");
  makeChart("chart-rate", "rate");
  makeChart("chart-reverse", "reverse_lag");

  let last = null;
  fetch("/api/samples", { headers: { accept: "application/json" } })
    .then((r) => r.json())
    .then((samples) => {
      samples.forEach(addSample);
      if (samples.length) { last = samples[samples.length - 1].t; }
      redraw();
    })
    .catch(() => {});

  const source = new EventSource("/events");
  source.onmessage = (msg) => {
    const event = JSON.parse(msg.data);
    live.innerHTML = event.html;
    document.getElementById("updated").textContent = event.taken_at;
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
    if (event.sample && event.sample.t !== last) {
      last = event.sample.t;
      addSample(event.sample);
      redraw();
    }
  };
  source.onerror = () => {
    document.getElementById("updated").textContent = "connection lost: retrying";
  };
})();
