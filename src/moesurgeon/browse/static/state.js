// state.js — the view lives in the URL hash (#layer=3&expert=5&lo=0&hi=47&q=gate&hide=t1,t2&show=t3),
// so a copied link reopens exactly this view. Every change goes through setState -> hash -> render.
"use strict";

const STATE = { layer: null, expert: null, lo: 0, hi: NUM_LAYERS - 1, q: "", hide: new Set(), show: new Set(), fold: false };

function clampInt(v, lo, hi) {
  const n = parseInt(v, 10);
  if (!isFinite(n)) return null;
  return Math.min(hi, Math.max(lo, n));
}

function readHash() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  const layer = params.has("layer") ? clampInt(params.get("layer"), 0, NUM_LAYERS - 1) : null;
  const expert = layer !== null && params.has("expert") ? clampInt(params.get("expert"), 0, Math.max(0, expertCount() - 1)) : null;
  let lo = params.has("lo") ? clampInt(params.get("lo"), 0, NUM_LAYERS - 1) : 0;
  let hi = params.has("hi") ? clampInt(params.get("hi"), 0, NUM_LAYERS - 1) : NUM_LAYERS - 1;
  if (lo === null) lo = 0;
  if (hi === null) hi = NUM_LAYERS - 1;
  if (hi < lo) [lo, hi] = [hi, lo];
  STATE.layer = layer;
  STATE.expert = expert;
  STATE.lo = lo;
  STATE.hi = hi;
  STATE.q = params.get("q") || "";
  STATE.hide = new Set((params.get("hide") || "").split(",").filter(Boolean));
  STATE.show = new Set((params.get("show") || "").split(",").filter(Boolean));
  STATE.fold = params.get("fold") === "1";
}

function writeHash() {
  const parts = [];
  if (STATE.layer !== null) parts.push("layer=" + STATE.layer);
  if (STATE.expert !== null && STATE.layer !== null) parts.push("expert=" + STATE.expert);
  if (STATE.lo !== 0 || STATE.hi !== NUM_LAYERS - 1) parts.push("lo=" + STATE.lo, "hi=" + STATE.hi);
  if (STATE.q) parts.push("q=" + encodeURIComponent(STATE.q));
  if (STATE.hide.size) parts.push("hide=" + [...STATE.hide].join(","));
  if (STATE.show.size) parts.push("show=" + [...STATE.show].join(","));
  if (STATE.fold) parts.push("fold=1");
  const hash = "#" + parts.join("&");
  if (location.hash !== hash && !(hash === "#" && location.hash === "")) location.hash = hash;
  else render();  // same hash: no hashchange event, draw anyway
}

function setState(patch) {
  Object.assign(STATE, patch);
  if (STATE.layer === null) STATE.expert = null;
  writeHash();
}

function selectLayer(layer, expert) {
  // selecting a layer outside the visible range brings it into view
  let { lo, hi } = STATE;
  if (layer !== null && (layer < lo || layer > hi)) {
    const span = hi - lo;
    lo = Math.max(0, Math.min(NUM_LAYERS - 1 - span, layer - Math.floor(span / 2)));
    hi = lo + span;
  }
  setState({ layer: layer, expert: expert === undefined ? null : expert, lo: lo, hi: hi });
}

function zoom(factor, centre) {
  const span = STATE.hi - STATE.lo + 1;
  const want = Math.max(1, Math.min(NUM_LAYERS, Math.round(span * factor)));
  const c = centre === undefined ? (STATE.layer !== null ? STATE.layer : (STATE.lo + STATE.hi) / 2) : centre;
  let lo = Math.round(c - want / 2);
  lo = Math.max(0, Math.min(NUM_LAYERS - want, lo));
  setState({ lo: lo, hi: lo + want - 1 });
}

function isCollapsed(track) {
  // a track is open unless hidden; a track closed by default (track.defaultHidden, or every track with
  // fold=1: the layer and expert panels in view) opens when listed in show
  return track.defaultHidden || STATE.fold ? !STATE.show.has(track.id) : STATE.hide.has(track.id);
}

function toggleTrack(track) {
  const set = track.defaultHidden || STATE.fold ? STATE.show : STATE.hide;
  if (set.has(track.id)) set.delete(track.id); else set.add(track.id);
  writeHash();
}
