// fiscal-worker console: the overview refreshes itself; "select all" ticks a page's rows.
// No framework and no build step; the page works without it (a reload does the same).
(function () {
  "use strict";
  function refresh(box) {
    var every = Math.max(2, parseInt(box.getAttribute("data-every"), 10) || 5) * 1000;
    var url = box.getAttribute("data-refresh");
    function tick() {
      fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (response) {
          if (response.redirected || !response.ok) { throw new Error(String(response.status)); }
          return response.text();
        })
        .then(function (html) { box.innerHTML = html; box.removeAttribute("data-stale"); })
        .catch(function () { box.setAttribute("data-stale", "1"); })
        .then(function () { window.setTimeout(tick, every); });
    }
    window.setTimeout(tick, every);
  }
  document.addEventListener("DOMContentLoaded", function () {
    var live = document.getElementById("live");
    if (live) { refresh(live); }
    var all = document.getElementById("select-all");
    if (all) {
      all.addEventListener("change", function () {
        document.querySelectorAll("input.pick").forEach(function (box) { box.checked = all.checked; });
      });
    }
  });
})();
