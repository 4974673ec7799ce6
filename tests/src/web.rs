//! A demo site's REST API as a client program uses it: HTTPS verified against the demo's CA
//! (Python's `urllib` and `ssl`, so no TLS stack in this crate), JSON in and out, a bearer
//! token from `POST /api/auth/login/`.

use std::process::Command;

use crate::python;

/// One request: prints `{"status": N, "body": JSON or null}`; an HTTP error status is an answer.
const REQUEST: &str = r#"
import json, ssl, sys, urllib.error, urllib.request
base, ca, method, path, token, body = sys.argv[1:7]
request = urllib.request.Request(base.rstrip("/") + path, method=method,
                                 data=body.encode() if body else None)
request.add_header("Accept", "application/json")
if body:
    request.add_header("Content-Type", "application/json")
if token:
    request.add_header("Authorization", "Bearer " + token)
context = ssl.create_default_context(cafile=ca)
try:
    with urllib.request.urlopen(request, context=context, timeout=60) as response:
        status, data = response.status, response.read()
except urllib.error.HTTPError as e:
    status, data = e.code, e.read()
print(json.dumps({"status": status, "body": json.loads(data) if data else None}))
"#;

/// A logged-in client of a site's REST API.
pub struct WebApi {
    url: String,
    ca: String,
    token: String,
}

impl WebApi {
    /// Logs `address` in at `site` (`state.json` `sites.X`); panics when the login fails.
    pub fn login(site: &serde_json::Value, address: &str, password: &str) -> WebApi {
        let mut api = WebApi {
            url: site["web"]["url"].as_str().expect("sites.X.web.url").to_owned(),
            ca: site["web"]["tls_ca"].as_str().expect("sites.X.web.tls_ca").to_owned(),
            token: String::new(),
        };
        let (status, tokens) =
            api.post("/api/auth/login/", &serde_json::json!({"address": address, "password": password}));
        assert_eq!(status, 200, "login of {address}: {tokens:#}");
        api.token = tokens["access_token"].as_str().expect("access_token").to_owned();
        api
    }

    /// `POST PATH` with a JSON body: the status and the JSON answer (null when empty).
    pub fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        self.request("POST", path, Some(body))
    }

    /// `GET PATH`: the status and the JSON answer.
    pub fn get(&self, path: &str) -> (u16, serde_json::Value) {
        self.request("GET", path, None)
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let out = Command::new(python())
            .args(["-c", REQUEST, &self.url, &self.ca, method, path, &self.token])
            .arg(body.map(|b| b.to_string()).unwrap_or_default())
            .output()
            .expect("python3 (QUTEMAIL_PYTHON)");
        assert!(out.status.success(), "{method} {path}: {}", String::from_utf8_lossy(&out.stderr));
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the client's JSON line");
        let status = answer["status"].as_u64().expect("status") as u16;
        (status, answer["body"].clone())
    }
}
