// dynheads per-token head viewer: plain JS over the JSON embedded in the page (no network, no libraries).
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("dynheads-data").textContent);
  const L = D.layers, H = D.heads, N = L * H;
  const S = { step: 0, cond: 0, head: null };
  const lit = [];  // prompt spans highlighted now
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    return e;
  };
  const label = (f) => "L" + Math.floor(f / H) + "-H" + (f % H);
  const stepOf = (c) => Math.min(S.step, Math.max(c.T - 1, 0));

  document.getElementById("title").textContent = D.title;
  document.getElementById("subtitle").textContent = D.subtitle;

  // prompt: one span per token, named spans (needle, supporting facts) marked once
  const markOf = new Array(D.prompt.length).fill("");
  for (const [name, spans] of Object.entries(D.marks))
    for (const [s, e] of spans) for (let p = s; p < e && p < markOf.length; p++) markOf[p] += " mark-" + name;
  const promptBox = document.getElementById("prompt");
  const frag = document.createDocumentFragment();
  const ptok = D.prompt.map((t, i) => {
    const s = el("span", "tok" + markOf[i], t);
    s.id = "p" + i;
    s.dataset.pos = i;
    frag.appendChild(s);
    return s;
  });
  promptBox.appendChild(frag);
  document.getElementById("legend").textContent = Object.keys(D.marks).map((m) => m).join(", ") + " marked in the prompt";

  // one block per condition: answer tokens and the layer x head grid
  const condBox = document.getElementById("conditions");
  D.conditions.forEach((c, ci) => {
    c.T = c.tokens.length;
    c.activeSets = c.active ? c.active.map((a) => new Set(a)) : null;
    c.ablSets = c.ablated ? c.ablated.map((a) => new Set(a)) : null;
    c.max = Math.max(1e-9, ...c.score);
    const box = el("div", "cond");
    box.dataset.c = ci;
    box.appendChild(el("h3", null, c.name + (c.note ? " — " + c.note : "")));
    const ans = el("div", "answer");
    c.tokSpans = c.tokens.map((t, i) => {
      const s = el("span", "atok", t === "" ? "∅" : t);
      s.dataset.step = i;
      s.addEventListener("click", () => setStep(i));
      ans.appendChild(s);
      return s;
    });
    box.appendChild(ans);
    const grid = el("div", "grid");
    grid.style.gridTemplateColumns = "2.6em repeat(" + H + ", 11px)";
    c.cells = [];
    for (let l = 0; l < L; l++) {
      grid.appendChild(el("span", "lab", "L" + l));
      for (let h = 0; h < H; h++) {
        const f = l * H + h, cell = el("span", "cell");
        cell.dataset.c = ci;
        cell.dataset.f = f;
        cell.title = label(f);
        cell.addEventListener("click", () => select(ci, f));
        grid.appendChild(cell);
        c.cells.push(cell);
      }
    }
    box.appendChild(grid);
    condBox.appendChild(box);
    c.variable = mostVariable(c, 10);
  });

  function mostVariable(c, k) {
    const out = [];
    for (let f = 0; f < N; f++) {
      let m = 0, v = 0;
      for (let t = 0; t < c.T; t++) m += c.score[t * N + f];
      m /= Math.max(c.T, 1);
      for (let t = 0; t < c.T; t++) v += (c.score[t * N + f] - m) ** 2;
      out.push([v, -f]);
    }
    return out.sort((a, b) => b[0] - a[0] || b[1] - a[1]).slice(0, k).filter((x) => x[0] > 0).map((x) => -x[1]);
  }

  function paintGrids() {
    D.conditions.forEach((c, ci) => {
      const t = stepOf(c), act = c.activeSets && c.T ? c.activeSets[t] : null;
      const abl = c.ablSets && c.T ? c.ablSets[t] : null;
      for (let f = 0; f < N; f++) {
        const v = c.T ? c.score[t * N + f] / c.max : 0, cell = c.cells[f];
        cell.style.background = v > 0 ? "rgba(200,30,30," + (0.15 + 0.85 * v).toFixed(3) + ")" : "";
        cell.classList.toggle("dt", !!(act && act.has(f)));
        cell.classList.toggle("abl", !!(abl && abl.has(f)));
        cell.classList.toggle("sel", S.head === f && S.cond === ci);
      }
      c.tokSpans.forEach((s, i) => s.classList.toggle("cur", i === t));
    });
  }

  function highlight(scroll) {
    while (lit.length) {
      const s = lit.pop();
      s.classList.remove("top1", "topk");
      s.style.removeProperty("--w");
    }
    document.querySelectorAll(".win").forEach((s) => s.classList.remove("win"));
    const c = D.conditions[S.cond], t = stepOf(c), info = document.getElementById("info");
    if (c.windows) for (const [s, e] of c.windows) for (let p = s; p < e && p < ptok.length; p++) ptok[p].classList.add("win");
    if (S.head === null || !c.T) {
      info.textContent = c.T ? "click a head" : "this condition generated no token";
      return;
    }
    const f = S.head, lines = [c.name + " · step " + t + " «" + c.tokens[t] + "» · " + label(f) +
      " · score " + c.score[t * N + f] + (c.activeSets && c.activeSets[t].has(f) ? " · in D_t" : "")];
    let first = null;
    if (c.topk_pos) {
      const k = c.k, parts = [];
      for (let j = 0; j < k; j++) {
        const p = c.topk_pos[(t * N + f) * k + j], w = c.topk_weight[(t * N + f) * k + j];
        if (p < 0 || p >= ptok.length) continue;
        ptok[p].classList.add("topk");
        ptok[p].style.setProperty("--w", Math.min(1, 0.2 + w).toFixed(3));
        lit.push(ptok[p]);
        parts.push(p + ":" + JSON.stringify(D.prompt[p]) + " " + w.toFixed(3));
      }
      lines.push("top-" + k + ": " + parts.join(", "));
    }
    if (c.top1) {
      const p = c.top1[t * N + f];
      if (p >= 0 && p < ptok.length) {
        ptok[p].classList.add("top1");
        lit.push(ptok[p]);
        first = ptok[p];
        lines.push("top-1 position " + p + " " + JSON.stringify(D.prompt[p]));
      } else lines.push("top-1 position " + p + " (a generated token)");
    } else lines.push("this run recorded no attended positions (mass on the named spans only)");
    info.textContent = lines.join("\n");
    if (first && scroll) first.scrollIntoView({ block: "center", inline: "nearest" });
  }

  function drawTimeline() {
    const c = D.conditions[S.cond], cv = document.getElementById("timeline"), ctx = cv.getContext("2d");
    const rows = c.variable.slice();
    if (S.head !== null && !rows.includes(S.head)) rows.push(S.head);
    const cw = Math.max(5, Math.min(16, Math.floor(560 / Math.max(c.T, 1)))), rh = 13, left = 64;
    cv.width = left + cw * c.T + 4;
    cv.height = rh * rows.length + 4;
    cv.rows = rows; cv.cw = cw; cv.rh = rh; cv.left = left;
    ctx.font = "10px sans-serif";
    rows.forEach((f, r) => {
      ctx.fillStyle = f === S.head ? "#06c" : "#333";
      ctx.fillText(label(f), 2, r * rh + 10);
      for (let t = 0; t < c.T; t++) {
        const v = c.score[t * N + f] / c.max;
        ctx.fillStyle = v > 0 ? "rgba(200,30,30," + (0.15 + 0.85 * v).toFixed(3) + ")" : "#f4f4f4";
        ctx.fillRect(left + t * cw, r * rh, cw - 1, rh - 1);
      }
    });
    ctx.strokeStyle = "#06c";
    ctx.strokeRect(left + stepOf(c) * cw - 0.5, 0, cw, rows.length * rh);
    document.getElementById("timeline-title").textContent =
      "Per-head timeline (Fig. 1): the 10 most variable heads of " + c.name + (S.head !== null ? " + selected" : "");
  }
  document.getElementById("timeline").addEventListener("click", (ev) => {
    const cv = ev.currentTarget, r = cv.getBoundingClientRect();
    const x = ev.clientX - r.left, y = ev.clientY - r.top, row = Math.floor(y / cv.rh);
    if (x > cv.left) setStep(Math.floor((x - cv.left) / cv.cw), true);
    if (row >= 0 && row < cv.rows.length) select(S.cond, cv.rows[row]);
  });

  // static ranking beside the timeline
  const rank = document.getElementById("ranking");
  document.getElementById("ranking-title").textContent = "Static ranking (" + D.static_source + ")";
  D.static.forEach(([f, v]) => {
    const li = el("li", null, label(f) + "  " + v.toFixed(3));
    li.dataset.f = f;
    li.addEventListener("click", () => select(S.cond, f));
    rank.appendChild(li);
  });

  function render(scroll) {
    paintGrids();
    highlight(scroll);
    drawTimeline();
    document.getElementById("step").textContent = "step " + S.step + " / " +
      (Math.max(...D.conditions.map((c) => c.T)) - 1) + "  (← → to step)";
  }
  function setStep(i) {
    const T = Math.max(...D.conditions.map((c) => c.T));
    S.step = Math.max(0, Math.min(i, T - 1));
    render(true);
  }
  function select(ci, f) {
    S.cond = ci;
    S.head = f;
    render(true);
  }
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "ArrowRight") { setStep(S.step + 1); ev.preventDefault(); }
    if (ev.key === "ArrowLeft") { setStep(S.step - 1); ev.preventDefault(); }
  });
  window.dynheadsViewer = { state: S, setStep: setStep, select: select, data: D };
  render(false);
})();
