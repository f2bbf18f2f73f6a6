//! An LLM judge over the OpenAI chat-completions API, for the judged benchmarks (MMHal-Bench,
//! WildVision-Bench; docs/design.md §5, "Judged benchmarks").
//!
//! - Every request body is hashed (SHA-256 of the JSON sent: model, messages, temperature,
//!   max_tokens); a reply is stored under that hash in the cache folder as soon as it arrives,
//!   so a re-run (or a run resumed after a failure) pays only for what was never answered.
//! - Transport errors, HTTP 408 / 429 and 5xx are retried with exponential backoff; any other
//!   HTTP status fails at once (a wrong model name or key does not get better by waiting).
//! - `complete_all` runs requests on `concurrency` threads and returns one result per request:
//!   the benchmark decides what a failure means (the runners stop with a clear error after every
//!   other request has been answered and cached).
//!
//! The judge is plain HTTP here; `https://` endpoints need the `judge-tls` feature (on by
//! default in the `misp` binary).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::files::{write_json_atomic, FileError};

/// Environment variables the API key is read from, in order.
pub const API_KEY_VARS: [&str; 2] = ["MISP_JUDGE_API_KEY", "OPENAI_API_KEY"];

/// Why one judge request failed for good.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JudgeError {
    /// The endpoint answered with an HTTP error that retrying does not fix, or kept failing
    /// through every retry.
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    /// A 200 answer that is not a chat completion.
    #[error("{url}: reply is not a chat completion ({message})")]
    Reply { url: String, message: String },
    #[error("judge cache: {0}")]
    Cache(String),
}

/// Where and how to reach the judge.
#[derive(Debug, Clone)]
pub struct JudgeConfig {
    /// Base URL (`https://api.openai.com/v1`) or the full `.../chat/completions` URL.
    pub url: String,
    pub model: String,
    /// Sent as `Authorization: Bearer KEY` when present.
    pub api_key: Option<String>,
    /// Folder of cached replies (created when missing).
    pub cache_dir: PathBuf,
    /// Retries after the first attempt.
    pub retries: usize,
    /// First backoff; doubled after each failed attempt, capped at 60 s.
    pub backoff: Duration,
    /// Per-request time limit (connect + answer).
    pub timeout: Duration,
    pub concurrency: usize,
}

impl JudgeConfig {
    /// The API key from [`API_KEY_VARS`], the first one that is set and not empty.
    pub fn api_key_from_env() -> Option<String> {
        API_KEY_VARS
            .iter()
            .filter_map(|v| std::env::var(v).ok())
            .find(|k| !k.trim().is_empty())
    }

    /// The chat-completions URL requests go to.
    pub fn endpoint(&self) -> String {
        let base = self.url.trim_end_matches('/');
        if base.ends_with("/chat/completions") {
            base.to_string()
        } else {
            format!("{base}/chat/completions")
        }
    }
}

/// One chat request: the messages and sampling settings of the benchmark's protocol.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub messages: Value,
    pub temperature: f64,
    pub max_tokens: Option<usize>,
}

impl ChatRequest {
    /// One user message of plain text, temperature 0 (MMHal-Bench's request).
    pub fn user_text(text: &str) -> Self {
        Self {
            messages: json!([{"role": "user", "content": text}]),
            temperature: 0.0,
            max_tokens: None,
        }
    }

    /// The JSON body sent for `model`.
    pub fn body(&self, model: &str) -> Value {
        let mut body = json!({
            "model": model,
            "messages": self.messages,
            "temperature": self.temperature,
        });
        if let Some(m) = self.max_tokens {
            body["max_tokens"] = json!(m);
        }
        body
    }
}

/// The cache key of a request body: hex SHA-256 of its JSON text (model and prompt included).
pub fn cache_key(body: &Value) -> String {
    let digest = Sha256::digest(body.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// How many requests were answered from the cache and how many went to the endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JudgeStats {
    pub cached: usize,
    pub requested: usize,
    /// Attempts that failed and were retried.
    pub retried: usize,
}

/// The judge client: cache, retries and a thread pool over one HTTP agent.
pub struct Judge {
    config: JudgeConfig,
    agent: ureq::Agent,
    stats: Mutex<JudgeStats>,
}

impl Judge {
    pub fn new(config: JudgeConfig) -> Result<Self, JudgeError> {
        std::fs::create_dir_all(&config.cache_dir)
            .map_err(|e| JudgeError::Cache(format!("{}: {e}", config.cache_dir.display())))?;
        let endpoint = config.endpoint();
        if endpoint.starts_with("https://") && !cfg!(feature = "judge-tls") {
            return Err(JudgeError::Http {
                url: endpoint,
                message: "https needs misp built with the `judge-tls` feature".into(),
            });
        }
        if !endpoint.starts_with("http://") && !endpoint.starts_with("https://") {
            return Err(JudgeError::Http {
                url: endpoint,
                message: "the judge URL must start with http:// or https://".into(),
            });
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(config.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self {
            config,
            agent,
            stats: Mutex::new(JudgeStats::default()),
        })
    }

    pub fn config(&self) -> &JudgeConfig {
        &self.config
    }

    pub fn stats(&self) -> JudgeStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self, f: impl FnOnce(&mut JudgeStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn cache_path(&self, key: &str) -> PathBuf {
        self.config.cache_dir.join(format!("{key}.json"))
    }

    /// The cached reply of `key`, if any (an unreadable entry counts as absent and is
    /// replaced).
    fn cached(&self, key: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.cache_path(key)).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        v.get("reply")?.as_str().map(str::to_string)
    }

    /// The judge's reply to `req`: from the cache, or from the endpoint (then cached).
    pub fn complete(&self, req: &ChatRequest) -> Result<String, JudgeError> {
        let body = req.body(&self.config.model);
        let key = cache_key(&body);
        if let Some(reply) = self.cached(&key) {
            self.bump(|s| s.cached += 1);
            return Ok(reply);
        }
        let reply = self.post_with_retries(&body)?;
        self.bump(|s| s.requested += 1);
        let entry = json!({"model": self.config.model, "key": key, "reply": reply});
        write_json_atomic(&self.cache_path(&key), &entry)
            .map_err(|e: FileError| JudgeError::Cache(e.to_string()))?;
        Ok(reply)
    }

    fn post_with_retries(&self, body: &Value) -> Result<String, JudgeError> {
        let url = self.config.endpoint();
        let text = body.to_string();
        let mut wait = self.config.backoff;
        let mut attempt = 0;
        loop {
            match self.post_once(&url, &text) {
                Ok(reply) => return Ok(reply),
                Err((retryable, message)) => {
                    if !retryable || attempt >= self.config.retries {
                        let tries = attempt + 1;
                        return Err(JudgeError::Http {
                            url,
                            message: if retryable {
                                format!("{message} (gave up after {tries} attempts)")
                            } else {
                                message
                            },
                        });
                    }
                    tracing::warn!("judge request failed ({message}); retrying in {wait:?}");
                    self.bump(|s| s.retried += 1);
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(60));
                    attempt += 1;
                }
            }
        }
    }

    /// One POST: the reply text, or `(retryable, why)`.
    fn post_once(&self, url: &str, body: &str) -> Result<String, (bool, String)> {
        let mut request = self
            .agent
            .post(url)
            .header("Content-Type", "application/json");
        if let Some(key) = &self.config.api_key {
            request = request.header("Authorization", &format!("Bearer {key}"));
        }
        let mut response = request
            .send(body)
            .map_err(|e| (true, format!("request failed: {e}")))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| (true, format!("reading the reply: {e}")))?;
        if status != 200 {
            let retryable = status == 408 || status == 429 || status >= 500;
            let snippet: String = text.chars().take(300).collect();
            return Err((retryable, format!("HTTP {status}: {snippet}")));
        }
        parse_completion(&text).map_err(|m| (false, format!("reply is not a chat completion: {m}")))
    }

    /// Every request's reply or error, in order, `concurrency` at a time, with a progress bar.
    pub fn complete_all(
        &self,
        requests: &[ChatRequest],
        what: &str,
    ) -> Vec<Result<String, JudgeError>> {
        let n = requests.len();
        let results: Vec<Mutex<Option<Result<String, JudgeError>>>> =
            (0..n).map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let bar = super::progress(n, what);
        let threads = self.config.concurrency.clamp(1, n.max(1));
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let r = self.complete(&requests[i]);
                    *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                    bar.inc(1);
                });
            }
        });
        bar.finish_and_clear();
        results
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .unwrap_or_else(|| Err(JudgeError::Cache("request was never run".to_string())))
            })
            .collect()
    }
}

/// `choices[0].message.content` of a chat-completion reply.
pub fn parse_completion(text: &str) -> Result<String, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    v.pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| "no choices[0].message.content string".to_string())
}

/// Every result's reply, or an error naming how many failed and the first failure (what was
/// answered is in the cache already, so a re-run only asks for the rest).
pub fn all_or_error(
    results: Vec<Result<String, JudgeError>>,
    cache_dir: &Path,
) -> Result<Vec<String>, super::EvalError> {
    let failed = results.iter().filter(|r| r.is_err()).count();
    if let Some(Err(first)) = results.iter().find(|r| r.is_err()) {
        return Err(super::EvalError::Input(format!(
            "{failed} of {} judge requests failed (the {} answered are cached in {}; a re-run asks only for the rest); first: {first}",
            results.len(),
            results.len() - failed,
            cache_dir.display()
        )));
    }
    Ok(results.into_iter().filter_map(Result::ok).collect())
}

/// A `data:` URL of an image file, its MIME type from the extension (as Python's
/// `mimetypes.guess_type`, which the reference scripts use).
pub fn image_data_url(path: &Path) -> Result<String, FileError> {
    let bytes = std::fs::read(path).map_err(|e| FileError::new(path, e))?;
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let mime = match ext.as_str() {
        "jpg" | "jpeg" | "jpe" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "bmp" => "image/bmp",
        _ => "application/octet-stream",
    };
    Ok(format!("data:{mime};base64,{}", base64::encode(bytes)))
}

#[cfg(test)]
pub(crate) mod fake {
    //! A scripted OpenAI-style endpoint on 127.0.0.1 for the judge tests: each POST gets the
    //! next scripted `(status, content)`; the requests' bodies are recorded.

    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    pub struct FakeJudge {
        pub url: String,
        pub bodies: Arc<Mutex<Vec<String>>>,
    }

    /// Serves `script` in order; after it runs out, every request gets `fallback`. `reply`
    /// turns a request body into the content when the script entry's content is `None`.
    pub fn start(
        script: Vec<(u16, Option<String>)>,
        fallback: (u16, String),
        reply: fn(&str) -> String,
    ) -> FakeJudge {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let seen = bodies.clone();
        let script = Arc::new(Mutex::new(script.into_iter()));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    let l = line.to_ascii_lowercase();
                    if let Some(v) = l.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0u8; len];
                let _ = reader.read_exact(&mut body);
                let body = String::from_utf8_lossy(&body).into_owned();
                let (status, content) = match script.lock().unwrap().next() {
                    Some((s, Some(c))) => (s, c),
                    Some((s, None)) => (s, reply(&body)),
                    None => (fallback.0, fallback.1.clone()),
                };
                seen.lock().unwrap().push(body);
                let payload = if status == 200 {
                    serde_json::json!({"choices": [{"message": {"role": "assistant", "content": content}}]})
                        .to_string()
                } else {
                    content
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
                    payload.len()
                );
            }
        });
        FakeJudge { url, bodies }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str, dir: &Path) -> JudgeConfig {
        JudgeConfig {
            url: url.to_string(),
            model: "judge-1".into(),
            api_key: Some("sk-test".into()),
            cache_dir: dir.to_path_buf(),
            retries: 2,
            backoff: Duration::from_millis(5),
            timeout: Duration::from_secs(10),
            concurrency: 3,
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("misp-judge-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn endpoint_accepts_a_base_or_the_full_url() {
        let mut c = config("http://h:1/v1/", Path::new("x"));
        assert_eq!(c.endpoint(), "http://h:1/v1/chat/completions");
        c.url = "http://h:1/v1/chat/completions".into();
        assert_eq!(c.endpoint(), "http://h:1/v1/chat/completions");
    }

    #[test]
    fn retries_server_errors_then_caches_so_a_rerun_sends_nothing() {
        let dir = tmp("retry");
        let fake = fake::start(
            vec![
                (500, Some("{\"error\": \"busy\"}".into())),
                (429, Some("{\"error\": \"slow down\"}".into())),
            ],
            (200, String::new()),
            |body| format!("echo {}", body.len()),
        );
        let judge = Judge::new(config(&fake.url, &dir)).unwrap();
        let req = ChatRequest::user_text("Rate this.");
        let first = judge.complete(&req).unwrap();
        assert_eq!(judge.stats().retried, 2);
        assert_eq!(fake.bodies.lock().unwrap().len(), 3);
        let sent: Value = serde_json::from_str(&fake.bodies.lock().unwrap()[2]).unwrap();
        assert_eq!(sent["model"], "judge-1");
        assert_eq!(sent["messages"][0]["content"], "Rate this.");
        assert_eq!(sent["temperature"], 0.0);
        // A new client on the same cache: no request at all.
        let again = Judge::new(config(&fake.url, &dir)).unwrap();
        assert_eq!(again.complete(&req).unwrap(), first);
        assert_eq!(
            again.stats(),
            JudgeStats {
                cached: 1,
                requested: 0,
                retried: 0
            }
        );
        assert_eq!(fake.bodies.lock().unwrap().len(), 3);
        // Another model is another key.
        let mut other = config(&fake.url, &dir);
        other.model = "judge-2".into();
        Judge::new(other).unwrap().complete(&req).unwrap();
        assert_eq!(fake.bodies.lock().unwrap().len(), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn gives_up_after_the_retries_and_fails_at_once_on_client_errors() {
        let dir = tmp("giveup");
        let fake = fake::start(vec![], (503, "down".into()), |_| String::new());
        let judge = Judge::new(config(&fake.url, &dir)).unwrap();
        let err = judge.complete(&ChatRequest::user_text("x")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("HTTP 503") && msg.contains("after 3 attempts"),
            "{msg}"
        );
        assert_eq!(fake.bodies.lock().unwrap().len(), 3);

        let fake = fake::start(vec![], (401, "bad key".into()), |_| String::new());
        let judge = Judge::new(config(&fake.url, &dir)).unwrap();
        let msg = judge
            .complete(&ChatRequest::user_text("x"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("HTTP 401: bad key") && !msg.contains("attempts"),
            "{msg}"
        );
        assert_eq!(fake.bodies.lock().unwrap().len(), 1);

        let judge = Judge::new(config("http://127.0.0.1:1/v1", &dir)).unwrap();
        let msg = judge
            .complete(&ChatRequest::user_text("x"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("request failed"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_judge_failing_partway_keeps_what_it_judged_and_a_rerun_asks_only_for_the_rest() {
        let dir = tmp("partway");
        // Two answers, then the endpoint is down (HTTP 503) for good.
        let fake = fake::start(
            vec![(200, None), (200, None)],
            (503, "down".into()),
            |body| {
                let v: Value = serde_json::from_str(body).unwrap();
                format!("re: {}", v["messages"][0]["content"].as_str().unwrap())
            },
        );
        let mut c = config(&fake.url, &dir);
        c.concurrency = 1; // in order: q0 and q1 answered, q2 and q3 refused
        c.retries = 1;
        let reqs: Vec<ChatRequest> = (0..4)
            .map(|i| ChatRequest::user_text(&format!("q{i}")))
            .collect();
        let judge = Judge::new(c).unwrap();
        let msg = all_or_error(judge.complete_all(&reqs, "test"), &dir)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("2 of 4 judge requests failed")
                && msg.contains("the 2 answered are cached")
                && msg.contains("HTTP 503")
                && msg.contains("after 2 attempts"),
            "{msg}"
        );
        // Two answers and their retries' failures: 2 + 2 x 2 requests.
        assert_eq!(fake.bodies.lock().unwrap().len(), 6);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);

        // The endpoint back: the re-run sends only the two that failed.
        let back = fake::start(
            (0..2).map(|_| (200, None)).collect(),
            (500, "no more".into()),
            |body| {
                let v: Value = serde_json::from_str(body).unwrap();
                format!("re: {}", v["messages"][0]["content"].as_str().unwrap())
            },
        );
        let again = Judge::new(config(&back.url, &dir)).unwrap();
        let out = all_or_error(again.complete_all(&reqs, "test"), &dir).unwrap();
        assert_eq!(out, ["re: q0", "re: q1", "re: q2", "re: q3"]);
        let sent: Vec<String> = back.bodies.lock().unwrap().clone();
        assert_eq!(sent.len(), 2);
        assert!(sent[0].contains("q2") || sent[0].contains("q3"), "{sent:?}");
        assert_eq!(again.stats().cached, 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn complete_all_keeps_order_across_threads() {
        let dir = tmp("all");
        let fake = fake::start(
            (0..12).map(|_| (200, None)).collect(),
            (500, "x".into()),
            |body| {
                let v: Value = serde_json::from_str(body).unwrap();
                format!("re: {}", v["messages"][0]["content"].as_str().unwrap())
            },
        );
        let judge = Judge::new(config(&fake.url, &dir)).unwrap();
        let reqs: Vec<ChatRequest> = (0..12)
            .map(|i| ChatRequest::user_text(&format!("q{i}")))
            .collect();
        let out = all_or_error(judge.complete_all(&reqs, "test"), &dir).unwrap();
        let want: Vec<String> = (0..12).map(|i| format!("re: q{i}")).collect();
        assert_eq!(out, want);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cache_keys_follow_model_and_prompt() {
        let a = ChatRequest::user_text("p").body("m");
        assert_eq!(
            cache_key(&a),
            cache_key(&ChatRequest::user_text("p").body("m"))
        );
        assert_ne!(
            cache_key(&a),
            cache_key(&ChatRequest::user_text("q").body("m"))
        );
        assert_ne!(
            cache_key(&a),
            cache_key(&ChatRequest::user_text("p").body("n"))
        );
        assert_eq!(cache_key(&a).len(), 64);
    }
}
