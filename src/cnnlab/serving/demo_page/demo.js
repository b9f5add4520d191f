// The demo page: an image (file, drop or webcam snapshot) -> POST invocations -> faces boxed, probabilities charted.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#2457c5", "#c2410c", "#0f766e", "#a21caf", "#b45309", "#be123c", "#4d7c0f", "#6d28d9"];
let maxFileBytes = 10 * 2 ** 20;  // until /status says the demo server's limit
let current = null;  // the image last sent: {blob, name}
let stream = null;  // the webcam's MediaStream while it is on

const mb = (bytes) => `${(bytes / 2 ** 20).toFixed(1)} MB`;
const percent = (p) => `${(100 * p).toFixed(1)}%`;

function show(id, visible) { $(id).hidden = !visible; }

function showError(text) {
  $("error").textContent = text;
  show("error", true);
  show("result", false);
}

function busy(on, text = "") {
  $("progress").textContent = text;
  for (const id of ["file", "camera-start", "snapshot", "whole"]) $(id).disabled = on;
}

async function checkModel() {
  const status = $("model-status");
  try {
    const answer = await (await fetch("status")).json();
    maxFileBytes = answer.max_file_bytes;
    status.textContent = answer.message;
    status.className = `model-status ${answer.ready ? "up" : "down"}`;
  } catch (e) {
    status.textContent = `The demo server is not answering (${e.message}); is \`cnnlab demo\` still running?`;
    status.className = "model-status down";
  }
}

// The EXIF orientation of a JPEG (1 when none): browsers show photos upright, the model decodes the raw pixels.
async function exifOrientation(blob) {
  const view = new DataView(await blob.slice(0, 128 * 1024).arrayBuffer());
  try {
    if (view.getUint16(0) !== 0xffd8) return 1;
    for (let at = 2; at + 4 < view.byteLength; at += 2 + view.getUint16(at + 2)) {
      const marker = view.getUint16(at);
      if (marker === 0xffe1 && view.getUint32(at + 4) === 0x45786966) {  // APP1 "Exif"
        const tiff = at + 10, little = view.getUint16(tiff) === 0x4949;
        const ifd = tiff + view.getUint32(tiff + 4, little);
        for (let i = 0, n = view.getUint16(ifd, little); i < n; i++) {
          const entry = ifd + 2 + 12 * i;
          if (view.getUint16(entry, little) === 0x0112) return view.getUint16(entry + 8, little);
        }
        return 1;
      }
      if (marker === 0xffda || (marker & 0xff00) !== 0xff00) return 1;  // image data: no EXIF before it
    }
  } catch (e) {
    if (!(e instanceof RangeError)) throw e;  // a truncated header: the server will name the problem
  }
  return 1;
}

// The photo as the browser shows it, so the boxes the model returns land on the faces you see.
async function upright(blob) {
  if ((await exifOrientation(blob)) === 1) return blob;
  const bitmap = await createImageBitmap(blob, {imageOrientation: "from-image"});
  const canvas = Object.assign(document.createElement("canvas"), {width: bitmap.width, height: bitmap.height});
  canvas.getContext("2d").drawImage(bitmap, 0, 0);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.95));
}

function base64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// MLflow wraps the model's message as "Failed to predict data '...'. \nError: <message>"; keep the message.
function serverMessage(answer, status) {
  const text = (answer && answer.message) || `the server answered HTTP ${status}`;
  const at = text.indexOf("\nError: ");
  return (at >= 0 ? text.slice(at + 8) : text).trim().replace(/^row 0: /, "");
}

async function invoke(blob, detectFaces) {
  const image = await base64(blob);
  const body = {dataframe_split: {columns: ["image"], data: [[image]]},
                params: {detect_faces: detectFaces, explain: true}};
  let response;
  try {
    response = await fetch("invocations", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  } catch (e) {
    throw new Error(`the demo server did not answer (${e.message}); is \`cnnlab demo\` still running?`);
  }
  const text = await response.text();
  let answer = null;
  try { answer = JSON.parse(text); } catch { answer = {message: `HTTP ${response.status}: ${text.slice(0, 300)}`}; }
  if (!response.ok) throw new Error(serverMessage(answer, response.status));
  return {row: answer.predictions[0], version: response.headers.get("X-Cnnlab-Model-Version")};
}

async function analyze(blob, name, detectFaces = true) {
  show("error", false);
  if (!blob.size) return showError(`${name} is empty.`);
  if (blob.size > maxFileBytes) {
    return showError(`${name} is ${mb(blob.size)}; this demo accepts images up to ${mb(maxFileBytes)}.`);
  }
  busy(true, `Asking the model about ${name}\u2026`);
  try {
    const sent = detectFaces ? await upright(blob) : blob;
    const {row, version} = await invoke(sent, detectFaces);
    current = {blob: sent, name};
    await render(row, sent, name, detectFaces, version);
  } catch (e) {
    showError(`${name}: ${e.message}`);
  } finally {
    busy(false);
  }
}

async function render(row, blob, name, detectFaces, version) {
  const photo = $("photo");
  URL.revokeObjectURL(photo.src);
  photo.src = URL.createObjectURL(blob);
  await photo.decode().catch(() => {});  // the model read it even if this browser cannot show it
  for (const box of document.querySelectorAll("#stage .box")) box.remove();
  $("faces").replaceChildren();
  show("result", true);
  const faces = detectFaces ? row.detections : [row];
  $("result-title").textContent = detectFaces ? `${name}: ${row.message}` : `${name}: the whole image`;
  photo.alt = `${name}, ${detectFaces ? row.message : "classified as a whole"}`;
  $("caption").textContent = (detectFaces ? "Boxes: the faces OpenCV's detector found, labeled by the model."
    : "The whole image, resized to the model's input, classified as one face.") +
    (version ? ` Model version ${version}.` : "");
  $("no-face-text").textContent = `No face found in ${name}.`;
  show("no-face", detectFaces && faces.length === 0);
  faces.forEach((face, i) => {
    const color = COLORS[i % COLORS.length];
    const title = detectFaces ? `Face ${i + 1}` : "Whole image";
    if (face.box && photo.naturalWidth) drawBox(face, i, color, photo);
    $("faces").append(card(face, title, color, photo));
  });
}

function probabilities(face) {
  return Object.entries(face).filter(([key]) => key.startsWith("prob_")).map(([key, p]) => [key.slice(5), p]);
}

function drawBox(face, i, color, photo) {
  const {x, y, w, h} = face.box, W = photo.naturalWidth || 1, H = photo.naturalHeight || 1;
  const box = Object.assign(document.createElement("div"), {className: "box"});
  box.setAttribute("aria-hidden", "true");  // the cards say the same in words
  Object.assign(box.style, {left: `${100 * x / W}%`, top: `${100 * y / H}%`, width: `${100 * w / W}%`,
                            height: `${100 * h / H}%`});
  box.style.setProperty("--face", color);
  const tag = Object.assign(document.createElement("span"), {className: "tag"});
  tag.textContent = `${i + 1} ${face.label} ${percent(face[`prob_${face.label}`])}`;
  box.append(tag);
  $("stage").append(box);
}

function card(face, title, color, photo) {
  const item = Object.assign(document.createElement("li"), {className: "face-card"});
  item.style.setProperty("--face", color);
  const head = Object.assign(document.createElement("div"), {className: "face-head"});
  const crop = document.createElement("canvas");
  crop.width = crop.height = 112;
  crop.setAttribute("aria-hidden", "true");
  const {x, y, w, h} = face.box || {x: 0, y: 0, w: photo.naturalWidth, h: photo.naturalHeight};
  if (photo.naturalWidth) crop.getContext("2d").drawImage(photo, x, y, w, h, 0, 0, 112, 112);
  const heading = document.createElement("h3");
  heading.textContent = `${title}: ${face.label} (${percent(face[`prob_${face.label}`])})`;
  head.append(crop);
  if (face.heatmap) {  // Grad-CAM of the predicted class: brighter where the network looked
    const heat = Object.assign(document.createElement("img"), {className: "heat", src: face.heatmap,
                                                               width: 112, height: 112});
    heat.alt = `${title}: where the model looked for ${face.label} (Grad-CAM)`;
    head.append(heat);
  }
  head.append(heading);
  const list = Object.assign(document.createElement("ul"), {className: "probs"});
  list.setAttribute("aria-label", `${title}: probability of each emotion`);
  for (const [label, p] of probabilities(face)) {
    const row = document.createElement("li");
    if (label === face.label) row.className = "top";
    const bar = Object.assign(document.createElement("span"), {className: "bar"});
    const fill = Object.assign(document.createElement("span"), {className: "fill"});
    fill.style.width = percent(p);
    bar.append(fill);
    bar.setAttribute("aria-hidden", "true");
    const value = Object.assign(document.createElement("span"), {className: "value", textContent: percent(p)});
    row.append(Object.assign(document.createElement("span"), {className: "name", textContent: label}), bar, value);
    list.append(row);
  }
  item.append(head, list);
  return item;
}

function cameraMessage(text, bad = false) {
  $("camera-message").textContent = text;
  $("camera-message").className = `camera-message${bad ? " bad" : ""}`;
}

function cameraProblem(e) {
  if (e.name === "NotAllowedError" || e.name === "SecurityError") {
    return "Camera permission was denied: allow the camera for this page in the browser's site settings, " +
           "or choose a photo instead.";
  }
  if (e.name === "NotFoundError" || e.name === "OverconstrainedError") {
    return "No camera found: choose a photo instead.";
  }
  if (e.name === "NotReadableError") return "The camera is busy in another application: close it and try again.";
  return `The webcam did not start (${e.name}: ${e.message}); choose a photo instead.`;
}

async function startCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    return cameraMessage("No camera access on this page: browsers allow the webcam only on https:// and " +
                         "http://localhost pages. Choose a photo instead.", true);
  }
  cameraMessage("Waiting for the camera\u2026");
  try {
    stream = await navigator.mediaDevices.getUserMedia({video: {width: {ideal: 1280}, height: {ideal: 720}}});
  } catch (e) {
    return cameraMessage(cameraProblem(e), true);
  }
  const video = $("video");
  video.srcObject = stream;
  await video.play();
  show("video", true);
  show("snapshot", true);
  show("camera-stop", true);
  show("camera-start", false);
  cameraMessage("Camera on: take a snapshot when your face is in view.");
}

function stopCamera() {
  if (stream) stream.getTracks().forEach((track) => track.stop());
  stream = null;
  $("video").srcObject = null;
  show("video", false);
  show("snapshot", false);
  show("camera-stop", false);
  show("camera-start", true);
  cameraMessage("");
}

function snapshot() {
  const video = $("video");
  const canvas = Object.assign(document.createElement("canvas"), {width: video.videoWidth, height: video.videoHeight});
  canvas.getContext("2d").drawImage(video, 0, 0);
  canvas.toBlob((blob) => analyze(blob, "webcam snapshot"), "image/jpeg", 0.92);
}

function setUp() {
  const input = $("file"), drop = $("drop");
  input.addEventListener("change", () => {
    if (input.files.length) analyze(input.files[0], input.files[0].name);
    input.value = "";  // the same file again is a new choice
  });
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (e) => e.preventDefault());  // stay here
  drop.addEventListener("dragover", () => drop.classList.add("over"));
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) analyze(file, file.name);
  });
  $("whole").addEventListener("click", () => current && analyze(current.blob, current.name, false));
  $("camera-start").addEventListener("click", startCamera);
  $("camera-stop").addEventListener("click", stopCamera);
  $("snapshot").addEventListener("click", snapshot);
  checkModel();
}

setUp();
