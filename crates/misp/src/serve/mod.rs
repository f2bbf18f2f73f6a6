//! `misp serve`: a LLaVA or Qwen2.5-VL checkpoint (+ adapter) behind an OpenAI-compatible HTTP
//! API, so the established harnesses (VLMEvalKit, lmms-eval: both have OpenAI-API model
//! wrappers) can evaluate a misp model on any benchmark they know (docs/design.md §5,
//! "Serving").
//!
//! - `POST /v1/chat/completions` (non-streaming): the messages' text parts, in order, joined by
//!   newlines, fill the checkpoint's prompt template; at most one image, as an `image_url`
//!   `data:` URL (base64) or a file path (or `file://` URL) under `--image-root`. A request
//!   without an image is answered about a blank image (all pixels at the processor's mean),
//!   since the prompt template holds one (Qwen2.5-VL's blank is its smallest grid, one image
//!   token). Decoding is greedy whatever `temperature` says (0 is what the harnesses send for
//!   evaluation); `max_tokens` (or `max_completion_tokens`) caps the answer.
//! - `GET /v1/models`, `GET /health`.
//! - Each connection has its own thread, which parses the request, decodes the image and
//!   tokenizes the prompt; the model runs on one worker thread that takes up to `max_batch`
//!   queued requests at once (waiting `batch_wait` for more after the first) and answers them
//!   in one batched greedy forward. The queue is bounded: a request arriving when it is full
//!   gets 503. Bodies over the size limit get 413, malformed JSON 400, an image path outside
//!   `--image-root` 403.

pub mod http;

use std::collections::VecDeque;
use std::io::BufReader;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::data::paths::{DatasetRoot, ESCAPES_ROOT};
use crate::model::vlm::{PreparedPrompt, Vlm};
use http::{error_body, read_request, write_json, HttpError};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The name `/v1/models` lists and replies carry.
    pub model_name: String,
    /// Requests waiting for the model at most; more get 503.
    pub queue_size: usize,
    /// Requests answered in one forward at most.
    pub max_batch: usize,
    /// How long the worker waits for more requests after the first of a batch.
    pub batch_wait: Duration,
    /// Request bodies over this many bytes get 413.
    pub max_body: usize,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// `max_tokens` is capped at this.
    pub max_tokens_limit: usize,
    /// File paths in `image_url` are admitted under this folder only; `None`: `data:` URLs only.
    pub image_root: Option<DatasetRoot>,
}

/// One request as the model worker sees it.
struct Job {
    prompt: PreparedPrompt,
    max_tokens: usize,
    reply: mpsc::Sender<Result<(Vec<u32>, String), String>>,
}

/// The bounded queue between connection threads and the model worker.
struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    ready: Condvar,
    capacity: usize,
}

impl Queue {
    fn push(&self, job: Job) -> Result<(), Job> {
        let mut q = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= self.capacity {
            return Err(job);
        }
        q.push_back(job);
        self.ready.notify_one();
        Ok(())
    }

    fn len(&self) -> usize {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Blocks for the first job, then gathers up to `max` of them, waiting at most `wait`
    /// for the batch to fill.
    fn take_batch(&self, max: usize, wait: Duration) -> Vec<Job> {
        let mut q = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        while q.is_empty() {
            q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        let deadline = Instant::now() + wait;
        while q.len() < max {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            q = self
                .ready
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let n = q.len().min(max);
        q.drain(..n).collect()
    }
}

/// The server: the model, its queue and the settings.
pub struct Server {
    vlm: Arc<Vlm>,
    config: ServeConfig,
    queue: Arc<Queue>,
    next_id: AtomicU64,
}

impl Server {
    pub fn new(vlm: Vlm, config: ServeConfig) -> Arc<Self> {
        Arc::new(Self {
            vlm: Arc::new(vlm),
            queue: Arc::new(Queue {
                jobs: Mutex::new(VecDeque::new()),
                ready: Condvar::new(),
                capacity: config.queue_size.max(1),
            }),
            config,
            next_id: AtomicU64::new(0),
        })
    }

    /// Serves `listener` until the process ends: the model worker on one thread, one thread
    /// per connection.
    pub fn run(self: &Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let worker = self.clone();
        std::thread::spawn(move || worker.work());
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let server = self.clone();
            std::thread::spawn(move || server.connection(stream));
        }
        Ok(())
    }

    /// The model worker: batches of queued requests through one greedy forward each.
    fn work(&self) {
        loop {
            let jobs = self
                .queue
                .take_batch(self.config.max_batch.max(1), self.config.batch_wait);
            let max_new = jobs.iter().map(|j| j.max_tokens).max().unwrap_or(0);
            let prompts: Vec<PreparedPrompt> = jobs.iter().map(|j| j.prompt.clone()).collect();
            match self.vlm.generate_ids(&prompts, max_new) {
                Ok(ids) => {
                    for (job, mut ids) in jobs.into_iter().zip(ids) {
                        // Greedy decoding is causal: a row's first n tokens are what a run
                        // with max n would have produced.
                        ids.truncate(job.max_tokens);
                        let text = self.vlm.decode(&ids).map_err(|e| e.to_string());
                        let _ = job.reply.send(text.map(|t| (ids, t)));
                    }
                }
                Err(e) => {
                    for job in jobs {
                        let _ = job.reply.send(Err(format!("generation failed: {e}")));
                    }
                }
            }
        }
    }

    fn connection(&self, stream: TcpStream) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
        let Ok(read) = stream.try_clone() else { return };
        let mut reader = BufReader::new(read);
        let mut writer = stream;
        let (status, body) = match read_request(&mut reader, self.config.max_body) {
            Ok(None) => return,
            Ok(Some(req)) => match self.route(&req.method, &req.path, &req.body) {
                Ok(v) => (200, v),
                Err(e) => (e.status, error_body(e.status, &e.message)),
            },
            Err(e) => (e.status, error_body(e.status, &e.message)),
        };
        let _ = write_json(&mut writer, status, &body);
        let _ = writer.shutdown(std::net::Shutdown::Both);
    }

    fn route(&self, method: &str, path: &str, body: &[u8]) -> Result<Value, HttpError> {
        match (method, path.trim_end_matches('/')) {
            ("GET", "/health") => Ok(json!({"status": "ok", "queued": self.queue.len()})),
            ("GET", "/v1/models") => Ok(json!({"object": "list", "data": [
                {"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "misp"}
            ]})),
            ("POST", "/v1/chat/completions") => self.chat(body),
            (_, "/health" | "/v1/models" | "/v1/chat/completions") => Err(HttpError::new(
                405,
                format!("{method} is not served on {path}"),
            )),
            _ => Err(HttpError::new(
                404,
                format!("no route {path} (served: POST /v1/chat/completions, GET /v1/models, GET /health)"),
            )),
        }
    }

    fn chat(&self, body: &[u8]) -> Result<Value, HttpError> {
        let req: Value = serde_json::from_slice(body)
            .map_err(|e| HttpError::new(400, format!("request body is not JSON: {e}")))?;
        let chat = parse_chat(&req, &self.config)?;
        let image = match &chat.image {
            None => self.vlm.blank_image(),
            Some(source) => {
                let bytes = self.image_bytes(source)?;
                let img = self
                    .vlm
                    .decode_bytes(&bytes)
                    .map_err(|e| HttpError::new(400, format!("image: {e}")))?;
                self.vlm
                    .image(&img, std::path::Path::new("the request's image"))
                    .map_err(|e| HttpError::new(400, e.to_string()))?
            }
        };
        let template_ids = self
            .vlm
            .prompt_template_ids(&chat.prompt)
            .map_err(|e| HttpError::new(400, e.to_string()))?;
        let prompt = self.vlm.prompt_with_image(&template_ids, image);
        let prompt_tokens = prompt.prompt_ids.len();
        let (tx, rx) = mpsc::channel();
        let job = Job {
            prompt,
            max_tokens: chat.max_tokens,
            reply: tx,
        };
        if self.queue.push(job).is_err() {
            return Err(HttpError::new(
                503,
                format!(
                    "the queue is full ({} requests waiting); retry later",
                    self.queue.capacity
                ),
            ));
        }
        let (ids, text) = rx
            .recv()
            .map_err(|_| HttpError::new(500, "the model worker stopped"))?
            .map_err(|e| HttpError::new(500, e))?;
        let stopped = ids.last().is_some_and(|t| self.vlm.stop_ids().contains(t));
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(json!({
            "id": format!("chatcmpl-misp-{n}"),
            "object": "chat.completion",
            "created": created,
            "model": self.config.model_name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": if stopped { "stop" } else { "length" },
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": ids.len(),
                "total_tokens": prompt_tokens + ids.len(),
            },
        }))
    }

    fn image_bytes(&self, source: &str) -> Result<Vec<u8>, HttpError> {
        if let Some(rest) = source.strip_prefix("data:") {
            let (meta, data) = rest
                .split_once(',')
                .ok_or_else(|| HttpError::new(400, "data: URL without a comma"))?;
            if !meta.ends_with(";base64") {
                return Err(HttpError::new(
                    400,
                    "data: URLs must be base64 (data:image/...;base64,...)",
                ));
            }
            let clean: String = data.chars().filter(|c| !c.is_whitespace()).collect();
            return base64::decode(clean)
                .map_err(|e| HttpError::new(400, format!("data: URL is not valid base64: {e}")));
        }
        if source.starts_with("http://") || source.starts_with("https://") {
            return Err(HttpError::new(
                400,
                "remote image URLs are not fetched; send a data: URL, or a file path under --image-root",
            ));
        }
        let path = source.strip_prefix("file://").unwrap_or(source);
        let root = self.config.image_root.as_ref().ok_or_else(|| {
            HttpError::new(
                403,
                "image file paths are served only under --image-root DIR; send a data: URL",
            )
        })?;
        let file = root.resolve(path).map_err(|e| {
            let status = if e.starts_with(ESCAPES_ROOT) {
                403
            } else {
                400
            };
            HttpError::new(status, e)
        })?;
        std::fs::read(&file)
            .map_err(|e| HttpError::new(400, format!("{}: {e}", Path::new(path).display())))
    }
}

/// What a chat request asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Chat {
    pub prompt: String,
    /// A `data:` URL or a file path.
    pub image: Option<String>,
    pub max_tokens: usize,
}

/// The prompt, image and answer length of an OpenAI chat-completions request.
pub fn parse_chat(req: &Value, config: &ServeConfig) -> Result<Chat, HttpError> {
    let bad = |m: String| HttpError::new(400, m);
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(bad(
            "streaming is not supported; send \"stream\": false".into()
        ));
    }
    if req.get("n").and_then(Value::as_u64).is_some_and(|n| n != 1) {
        return Err(bad("only n = 1 is served".into()));
    }
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| bad("`messages` must be a non-empty array".into()))?;
    let mut texts = Vec::new();
    let mut image = None;
    for (i, m) in messages.iter().enumerate() {
        match m.get("content") {
            Some(Value::String(s)) => texts.push(s.clone()),
            Some(Value::Array(parts)) => {
                for (j, p) in parts.iter().enumerate() {
                    match p.get("type").and_then(Value::as_str) {
                        Some("text") => texts.push(
                            p.get("text")
                                .and_then(Value::as_str)
                                .ok_or_else(|| bad(format!("messages[{i}].content[{j}].text must be a string")))?
                                .to_string(),
                        ),
                        Some("image_url") => {
                            let url = match p.get("image_url") {
                                Some(Value::String(s)) => Some(s.as_str()),
                                Some(v) => v.get("url").and_then(Value::as_str),
                                None => None,
                            }
                            .ok_or_else(|| bad(format!("messages[{i}].content[{j}].image_url.url must be a string")))?;
                            if image.replace(url.to_string()).is_some() {
                                return Err(bad("one image per request at most (the prompt template holds one)".into()));
                            }
                        }
                        other => {
                            return Err(bad(format!(
                                "messages[{i}].content[{j}]: type {other:?} is not served (text, image_url)"
                            )))
                        }
                    }
                }
            }
            Some(Value::Null) | None => {}
            Some(_) => {
                return Err(bad(format!(
                    "messages[{i}].content must be a string or an array of parts"
                )))
            }
        }
    }
    let max_tokens = match req
        .get("max_tokens")
        .or_else(|| req.get("max_completion_tokens"))
    {
        None | Some(Value::Null) => config.default_max_tokens,
        Some(v) => v
            .as_u64()
            .filter(|&n| n > 0)
            .ok_or_else(|| bad("max_tokens must be a positive integer".into()))?
            as usize,
    }
    .min(config.max_tokens_limit);
    Ok(Chat {
        prompt: texts.join("\n"),
        image,
        max_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ServeConfig {
        ServeConfig {
            model_name: "m".into(),
            queue_size: 2,
            max_batch: 4,
            batch_wait: Duration::from_millis(1),
            max_body: 1000,
            default_max_tokens: 16,
            max_tokens_limit: 32,
            image_root: None,
        }
    }

    #[test]
    fn the_queue_is_bounded_and_batches_what_waits() {
        let q = Queue {
            jobs: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            capacity: 3,
        };
        let job = |n: usize| Job {
            prompt: PreparedPrompt {
                prompt_ids: vec![n as u32],
                pixels: vec![],
                grid: None,
            },
            max_tokens: n,
            reply: mpsc::channel().0,
        };
        for n in 0..3 {
            assert!(q.push(job(n)).is_ok());
        }
        assert!(q.push(job(9)).is_err(), "full: the caller answers 503");
        let first = q.take_batch(2, Duration::from_millis(1));
        assert_eq!(
            first.iter().map(|j| j.max_tokens).collect::<Vec<_>>(),
            [0, 1]
        );
        let rest = q.take_batch(8, Duration::from_millis(5));
        assert_eq!(rest.len(), 1);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn chat_requests_parse_like_the_openai_api() {
        let req = json!({"model": "x", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
            ]}
        ], "max_tokens": 100, "temperature": 0});
        let c = parse_chat(&req, &config()).unwrap();
        assert_eq!(c.prompt, "Be brief.\nWhat is this?");
        assert_eq!(c.image.as_deref(), Some("data:image/png;base64,AAAA"));
        assert_eq!(c.max_tokens, 32, "capped at the limit");
        let plain = json!({"messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(parse_chat(&plain, &config()).unwrap().max_tokens, 16);
        for bad in [
            json!({"messages": []}),
            json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}),
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}),
            json!({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}),
            json!({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "a"}},
                {"type": "image_url", "image_url": {"url": "b"}}]}]}),
        ] {
            assert_eq!(
                parse_chat(&bad, &config()).unwrap_err().status,
                400,
                "{bad}"
            );
        }
    }
}
