// The service's HTTP API as the page uses it: GET /v1/models and POST /v1/models/{name}/segment
// (or /v1/segment), with the API key when the server wants one. Paths are relative, so the page also works behind a path prefix.

const KEY_STORAGE = "transfiner-api-key";

/** A failed call, worded as the API words it: {"error": {"code", "message"}}. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// Kept for this tab only: a reload does not ask again, closing the tab forgets it.
let apiKey = sessionStorage.getItem(KEY_STORAGE) || "";

export function setApiKey(key) {
  apiKey = key;
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

async function call(path, init = {}) {
  const headers = new Headers(init.headers);
  if (apiKey) headers.set("X-API-Key", apiKey);
  let response;
  try {
    response = await fetch(path, { ...init, headers });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "network_error", `the server did not answer (${error.message})`);
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = body && body.error;
    throw new ApiError(
      response.status,
      (detail && detail.code) || "http_error",
      (detail && detail.message) || `HTTP ${response.status} ${response.statusText}`,
    );
  }
  return body;
}

/** The served models' cards (name, version, classes, default, ...). */
export async function getModels() {
  return (await call("v1/models")).models;
}

/**
 * POST the file's bytes as they are; the parameters go in the query string. Declared as
 * octet-stream so the server always reads the body as the image (it sniffs what image it is),
 * whatever the file claims to be.
 */
export function segment(file, params, signal, model = null) {
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null) query.set(name, String(value));
  }
  const path = model === null ? "v1/segment" : `v1/models/${encodeURIComponent(model)}/segment`;
  return call(`${path}?${query}`, {
    method: "POST",
    body: file,
    headers: { "Content-Type": "application/octet-stream" },
    signal,
  });
}
