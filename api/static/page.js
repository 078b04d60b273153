// The person's page: every view and switch goes through the same API applications use.
"use strict";
const $ = (sel) => document.querySelector(sel);
let token = sessionStorage.getItem("stylestream-token");
let shownVersion = null;
let scopes = [];
const SVG = "http://www.w3.org/2000/svg";

function svgElement(name, attributes, title) {
  const element = document.createElementNS(SVG, name);
  Object.entries(attributes).forEach(([k, v]) => element.setAttribute(k, String(v)));
  if (title) {
    const t = document.createElementNS(SVG, "title");
    t.textContent = title;
    element.append(t);
  }
  return element;
}

function say(text, isError = false) {
  $("#message").textContent = text;
  $("#message").className = isError ? "error" : "";
}

// The response to a call with the person's token (a JSON body, or a form as it is); an Error with the
// API's message and code if it failed.
async function call(method, path, body) {
  const form = body instanceof FormData;
  const response = await fetch(path, {
    method, headers: { "Authorization": `Bearer ${token}`, ...(body && !form ? { "Content-Type": "application/json" } : {}) },
    body: body && !form ? JSON.stringify(body) : body,
  });
  if (!response.ok) {
    const data = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
    const error = new Error(data?.error?.message || `${response.status}`);
    error.status = response.status;
    error.code = data?.error?.code;
    throw error;
  }
  return response;
}

async function api(method, path, body) {
  const response = await call(method, path, body);
  return response.headers.get("content-type")?.includes("json") ? response.json() : null;
}

function swatch(colour, small = false) {
  const div = document.createElement("div");
  div.className = small ? "swatch small" : "swatch";
  div.style.background = colour;
  div.title = colour;
  return div;
}

async function showStyle() {
  let style;
  try {
    style = await api("GET", "/v1/me/style");
  } catch (e) {
    if (e.code === "no_style") { $("#words").textContent = "Nothing learned yet."; return null; }
    throw e;
  }
  shownVersion = style.version;
  $("#version").textContent = `version ${style.version} · ${style.photo_count} photos`;
  $("#words").textContent = style.words;
  $("#style-code").textContent = style.style_code || "";
  $("#palette").replaceChildren(...style.palette.map((c) => swatch(c)));
  $("#facets").replaceChildren(...style.facets.map((f) => {
    const li = document.createElement("li");
    li.append(...f.palette.map((c) => swatch(c, true)), ` ${f.words} (${f.photo_count} photos)`);
    return li;
  }));
  $("#features").replaceChildren(...Object.entries(style.features).map(([name, value]) => {
    const tr = document.createElement("tr");
    tr.innerHTML = "<td></td><td></td>";
    tr.children[0].textContent = name;
    tr.children[1].textContent = value.toFixed(3);
    return tr;
  }));
  const facet = $("#facet");
  facet.querySelectorAll("option[data-facet]").forEach((o) => o.remove());
  style.facets.forEach((f) => {
    const o = new Option(`facet ${f.index}: ${f.words}`, String(f.index));
    o.dataset.facet = "1";
    facet.append(o);
  });
  return style;
}

async function showHistory() {
  const { versions } = await api("GET", "/v1/me/style/history");
  const svg = $("#chart");
  const w = 320, h = 140, pad = 18;
  const most = Math.max(0.01, ...versions.map((v) => v.drift_from_first));
  const x = (i) => pad + (versions.length > 1 ? i * (w - 2 * pad) / (versions.length - 1) : (w - 2 * pad) / 2);
  const y = (d) => h - pad - d / most * (h - 2 * pad);
  const points = versions.map((v, i) => `${x(i)},${y(v.drift_from_first)}`).join(" ");
  const label = svgElement("text", { x: 4, y: 12, "font-size": 10 });
  label.textContent = "drift from your first style";
  svg.replaceChildren(label, svgElement("polyline", { fill: "none", stroke: "#3b6", "stroke-width": 2, points }),
    ...versions.map((v, i) => svgElement("circle", { cx: x(i), cy: y(v.drift_from_first), r: 3 },
      `version ${v.version} · ${v.updated_at.slice(0, 16)} · ${v.words}`)));
  $("#history-palettes").replaceChildren(...versions.map((v) => {
    const div = document.createElement("div");
    div.append(...v.palette.map((c) => swatch(c, true)), `v${v.version}`);
    return div;
  }));
}

async function showAlbums() {
  const { learning, albums } = await api("GET", "/v1/me/albums");
  $("#learning-all").checked = learning;
  $("#album-list").replaceChildren(...albums.map((a) => {
    const li = document.createElement("li");
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = a.learning;
    box.dataset.album = a.album_id ?? "";
    box.disabled = a.album_id === null || !scopes.includes("consent:write");  // photos in no album: no album switch
    box.addEventListener("change", () => switchLearning("album", a.album_id, box.checked));
    const device = a.on_device ? ` (${a.on_device === a.photo_count ? "all" : a.on_device} analysed on your device)` : "";
    label.append(box, ` ${a.album_id ?? "(no album)"} · ${a.photo_count} photos${device}`);
    li.append(label);
    return li;
  }));
}

async function switchLearning(scope, id, enabled) {
  const before = shownVersion;
  try {
    await api("PUT", "/v1/me/style-learning", { scope, id: scope === "user" ? null : id, enabled });
  } catch (e) {
    say(`The switch was not sent: ${e.message}`, true);
    await showAlbums();  // the boxes as they really are
    return;
  }
  say(`Style learning ${enabled ? "on" : "off"} for ${scope === "user" ? "all your photos" : `${scope} ${id}`}; ` +
      "your style updates once it is processed…");
  for (let i = 0; i < 120; i++) {  // a minute at most
    await new Promise((r) => setTimeout(r, 500));
    const style = await showStyle();
    if (style && style.version !== before) {
      say(`Your style is now version ${style.version}.`);
      await Promise.all([showHistory(), showAlbums()]);
      return;
    }
  }
  say("The switch was sent; your style has not changed yet (is ingestion running?).", true);
}

function figure(image, prompt) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = image.url;
  img.alt = prompt;
  const caption = document.createElement("figcaption");
  caption.textContent = `${prompt} · style v${image.style_version ?? "none"}` +
    (image.facet === null || image.facet === undefined ? " · overall" : ` · facet ${image.facet}`);
  fig.append(img, caption);
  return fig;
}

async function showGallery() {
  const { generations } = await api("GET", "/v1/me/generations");
  $("#gallery").replaceChildren(...generations.flatMap((g) => g.data.map((image) => figure(image, g.prompt))));
}

// A clip in the gallery: its MP4 fetched with the token and played from a blob: URL.
async function clipFigure(video) {
  const fig = document.createElement("figure");
  fig.dataset.video = video.id;
  const caption = document.createElement("figcaption");
  caption.textContent = `${video.prompt} · ${video.seconds} s · style v${video.style_version ?? "none"}`;
  if (video.status === "completed") {
    try {  // one clip that cannot be fetched says so in its caption; the rest of the page goes on
      const mp4 = await call("GET", `/v1/videos/${encodeURIComponent(video.id)}/content`);
      const player = Object.assign(document.createElement("video"), { controls: true, muted: true, loop: true,
        playsInline: true, src: URL.createObjectURL(await mp4.blob()) });
      fig.append(player);
    } catch (e) {
      caption.textContent += ` · cannot be played: ${e.message}`;
    }
  } else {
    caption.textContent += video.status === "failed" ? ` · failed: ${video.error?.message}` : " · being made…";
  }
  fig.append(caption);
  return fig;
}

async function showClips() {
  const { data } = await api("GET", "/v1/videos?limit=6");
  $("#clip-gallery").replaceChildren(...await Promise.all(data.map(clipFigure)));
}

async function makeClip() {
  const form = new FormData();
  form.append("prompt", $("#clip-prompt").value);
  form.append("seconds", $("#clip-seconds").value);
  form.append("motion", $("#clip-motion").value);
  const start = $("#clip-start").files[0];
  if (start) form.append("input_reference", start);
  let video = await api("POST", "/v1/videos", form);
  for (let i = 0; i < 240 && (video.status === "queued" || video.status === "in_progress"); i++) {  // two minutes
    await new Promise((r) => setTimeout(r, 500));
    video = await api("GET", `/v1/videos/${encodeURIComponent(video.id)}`);
  }
  $("#clip-gallery").prepend(await clipFigure(video));
  if (video.status === "completed") say(`Done: a ${video.seconds} s clip in style version ${video.style_version ?? "none"}.`);
  else if (video.status === "failed") say(`The clip failed: ${video.error?.message}`, true);
  else say("The clip is still being made; it will be in the gallery.", true);
}

async function showGrants() {
  const { grants } = await api("GET", "/v1/me/grants");
  $("#grant-list").replaceChildren(...grants.map((g) => {
    const li = document.createElement("li");
    li.dataset.grant = g.id;
    const state = g.revoked_at ? "revoked" : `until ${g.expires_at.slice(0, 10)}`;
    li.textContent = `${g.name}: ${g.scopes.join(", ")} (${state}) `;
    if (!g.revoked_at) {
      const button = document.createElement("button");
      button.textContent = "Revoke";
      button.addEventListener("click", async () => {
        await api("DELETE", `/v1/me/grants/${encodeURIComponent(g.id)}`);
        say(`${g.name} can no longer use your style.`);
        await showGrants();
      });
      li.append(button);
    }
    return li;
  }));
}

async function signIn(newToken) {
  token = newToken;
  try {
    const me = await api("GET", "/v1/me");
    sessionStorage.setItem("stylestream-token", token);
    scopes = me.scopes;
    $("#who").textContent = me.user_id;
    $("#sign-in").hidden = true;
    $("#signed-in").hidden = false;
    $("#sign-out").hidden = false;
    say("");
    // An application's token shows only what its grant allows; the person's own shows everything.
    const can = (scope) => scopes.includes(scope);
    for (const id of ["style", "history", "albums"]) $(`#${id}`).hidden = !can("style:read");
    $("#generate").hidden = $("#clips").hidden = !can("images:generate");
    $("#learning-all").disabled = !can("consent:write");
    $("#grants").hidden = $("#data").hidden = !can("account");
    if (can("style:read")) {
      await showStyle();
      await Promise.all([showHistory(), showAlbums()]);
    }
    await Promise.all([can("images:generate") ? showGallery() : null, can("images:generate") ? showClips() : null,
      can("account") ? showGrants() : null]);
  } catch (e) {
    sessionStorage.removeItem("stylestream-token");
    say(`Could not sign in: ${e.message}`, true);
  }
}

$("#sign-in-form").addEventListener("submit", (e) => { e.preventDefault(); signIn($("#token").value.trim()); });
$("#sign-out").addEventListener("click", () => { sessionStorage.removeItem("stylestream-token"); location.hash = ""; location.reload(); });
$("#learning-all").addEventListener("change", (e) => switchLearning("user", null, e.target.checked));
$("#strength").addEventListener("input", (e) => { $("#strength-value").textContent = Number(e.target.value).toFixed(1); });
$("#generate-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const facet = $("#facet").value;
  $("#generate-button").disabled = true;
  say("Generating…");
  try {
    const out = await api("POST", "/v1/images/generations", {
      prompt: $("#prompt").value, n: 1, response_format: "url", style_strength: Number($("#strength").value),
      facet: /^\d+$/.test(facet) ? Number(facet) : facet,
    });
    $("#gallery").prepend(...out.data.map((image) => figure(image, $("#prompt").value)));
    say(`Done: style version ${out.data[0]?.style_version ?? "none"}.`);
  } catch (err) {
    say(err.message, true);
  } finally {
    $("#generate-button").disabled = false;
  }
});
$("#clip-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("#clip-button").disabled = true;
  say("Making the clip…");
  try {
    await makeClip();
  } catch (err) {
    say(err.message, true);
  } finally {
    $("#clip-button").disabled = false;
  }
});
$("#grant-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const scopes = [...document.querySelectorAll("input[name=scope]:checked")].map((b) => b.value);
  try {
    const grant = await api("POST", "/v1/me/grants", {
      name: $("#grant-name").value, scopes, expires_in_s: Number($("#grant-days").value) * 86400,
    });
    $("#new-token-value").textContent = grant.token;
    $("#new-token").hidden = false;
    await showGrants();
  } catch (err) {
    say(err.message, true);
  }
});
$("#download").addEventListener("click", async () => {
  let blob;
  try {
    blob = await (await call("GET", "/v1/me/export")).blob();
  } catch (err) {
    say(`The download failed: ${err.message}`, true);
    return;
  }
  const link = Object.assign(document.createElement("a"), { href: URL.createObjectURL(blob), download: "my-style.json" });
  link.click();
});

const fromLink = new URLSearchParams(location.hash.slice(1)).get("token");
if (fromLink) history.replaceState(null, "", location.pathname);  // the token leaves the address bar
if (fromLink || token) signIn(fromLink || token);
