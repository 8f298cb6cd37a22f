// ipywidgets 8 typesets widget labels through the MathJax 2 API (MathJax.Hub.Queue); the book loads
// MathJax 3, which has no Hub. Give whichever object window.MathJax holds (the configuration first, the
// loaded MathJax 3 later) a Hub whose Queue typesets the element with MathJax 3. Loaded before the
// widget manager (_config.yml: nb_ipywidgets_js).
(function () {
  let current = window.MathJax;
  const hub = {
    Queue(...jobs) {
      for (const job of jobs) {
        const element = Array.isArray(job) ? job[2] : undefined;
        const mathjax = current;
        // before MathJax 3 has started, its first typesetting pass covers the whole page anyway
        if (element && mathjax && mathjax.startup && mathjax.startup.promise) {
          mathjax.startup.promise.then(() => mathjax.typesetPromise([element]));
        }
      }
    },
  };
  const attach = (value) => {
    if (value && typeof value === "object" && !value.Hub) value.Hub = hub;
    return value;
  };
  attach(current);
  Object.defineProperty(window, "MathJax", {
    configurable: true,
    get: () => current,
    set: (value) => {
      current = attach(value);
    },
  });
})();
