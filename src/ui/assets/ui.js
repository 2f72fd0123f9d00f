// Enhancements only: every page works without this script.
// - Forms with data-confirm ask before they are sent.
// - An element with data-refresh="SECONDS" reloads the page that often,
//   unless the visitor unticks it.
(function () {
  "use strict";
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });
  var toggle = document.querySelector("[data-refresh]");
  if (toggle) {
    var seconds = parseInt(toggle.getAttribute("data-refresh"), 10) || 10;
    toggle.hidden = false;
    var box = toggle.querySelector("input");
    setInterval(function () {
      if (box && box.checked) {
        window.location.reload();
      }
    }, seconds * 1000);
  }
  var all = document.querySelector("[data-select-all]");
  if (all) {
    all.hidden = false;
    all.addEventListener("change", function () {
      document.querySelectorAll("input[name=id]").forEach(function (box) {
        box.checked = all.checked;
      });
    });
  }
})();
