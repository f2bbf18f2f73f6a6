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
//! - `GET /health` also reports where a request's time went (`timings`): reading it, preparing
//!   it (JSON, image decode, tokens), waiting in the queue, the prompt passes and decode steps,
//!   answering.
//! - Each connection has its own thread and is persistent (HTTP/1.1 keep-alive), so a
//!   harness's client pays no connection setup per request; that thread parses the request,
//!   decodes the image, tokenizes the prompt and, after the model, detokenizes the answer: the
//!   model's threads do nothing but forwards.
//! - Batching is continuous (iteration-level), on two model threads. The decode thread keeps
//!   one running greedy decode of up to `max_batch` rows; a row that finishes (a stop id, or
//!   its own `max_tokens`) is answered at once and leaves the batch, so a two-token answer
//!   does not wait for a caption sharing its batch. The prompt thread runs the prompt passes
//!   of queued requests, batched, beside the decode (on the other core), and hands their KV
//!   rows to the decode thread, which merges them into the running batch between two steps:
//!   a client's next request joins the running decode instead of waiting for it to drain,
//!   and a prompt pass does not stop the running rows. While a decode runs, the prompt thread
//!   takes whatever is queued (the requests that arrive during one pass make the next batch),
//!   up to the rows free; with nothing running it takes a batch as it forms (holding it open
//!   while requests keep arriving less than `batch_wait` apart or are being prepared). Greedy
//!   answers are the same as `misp generate`'s: no row attends to another.
//!   The queue is bounded: a request arriving when it is full gets 503. Bodies
//!   over the size limit get 413 (before they are read; a client that sent `Expect:
//!   100-continue` gets `100 Continue` only for a body within the limit), malformed JSON 400, an
//!   image path outside `--image-root` 403.

pub mod http;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::data::paths::{DatasetRoot, ESCAPES_ROOT};
use crate::model::generate::{Prefill, RunningDecode};
use crate::model::vlm::{PreparedPrompt, Vlm};
use http::{error_body, read_request, write_json, HttpError};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The name `/v1/models` lists and replies carry.
    pub model_name: String,
    /// Requests waiting for the model at most; more get 503.
    pub queue_size: usize,
    /// Rows decoded at once at most (running, in a prompt pass and waiting to join, together).
    pub max_batch: usize,
    /// How long a batch stays open after the latest arrival (see `Queue::take_batch`).
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
    /// When it entered the queue.
    queued: Instant,
    /// The answer's token ids (EOS included when produced).
    reply: mpsc::Sender<Answer>,
}

/// The model's answer to one job: its token ids, or why it failed.
type Answer = Result<Vec<u32>, String>;

/// Prompts the prompt thread has run, for the decode thread to merge: their cache and first
/// tokens, and each row's reply channel and `max_tokens`.
struct Admission {
    prefill: Prefill,
    rows: Vec<(mpsc::Sender<Answer>, usize)>,
}

/// Answers every one of `replies` with the error `why`.
fn fail(replies: impl Iterator<Item = mpsc::Sender<Answer>>, why: &str) {
    for reply in replies {
        let _ = reply.send(Err(why.to_string()));
    }
}

/// The decode's rows, `max_batch` at most: running, being prefilled, or filled and waiting to
/// join. The prompt thread takes slots, the decode thread frees them as rows finish.
struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

impl Slots {
    fn new(max: usize) -> Self {
        Self {
            used: Mutex::new(0),
            freed: Condvar::new(),
            max: max.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks until a slot is free: how many are, and whether none is in use (nothing
    /// decoding). Only the prompt thread takes slots, so they stay free until it does.
    fn wait_free(&self) -> (usize, bool) {
        let mut used = self.lock();
        while *used >= self.max {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        (self.max - *used, *used == 0)
    }

    fn take(&self, n: usize) {
        *self.lock() += n;
    }

    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let mut used = self.lock();
        *used = used.saturating_sub(n);
        self.freed.notify_one();
    }
}

/// Where requests' time went, summed since the start (`GET /health` reports them), so that a
/// throughput gap can be pinned on a stage rather than guessed.
#[derive(Default)]
struct Timings {
    requests: AtomicU64,
    /// Batches admitted into the running decode (each one prompt pass).
    batches: AtomicU64,
    /// Rows over all admitted batches (their mean size is `batched_rows / batches`).
    batched_rows: AtomicU64,
    /// Rows prefilled while other rows were decoding (they joined a running decode).
    joined_rows: AtomicU64,
    /// Nanoseconds per stage: the request's bytes from its first byte to its last.
    read_ns: AtomicU64,
    /// JSON parse, image bytes and decode, pixels, prompt tokens.
    prepare_ns: AtomicU64,
    /// In the queue until the model's thread took it.
    queue_ns: AtomicU64,
    /// Decode steps, and the rows they ran (their mean is `step_rows / steps`).
    steps: AtomicU64,
    step_rows: AtomicU64,
    /// Batched prompt passes (one per admitted batch, not per request).
    prefill_ns: AtomicU64,
    /// Decode steps, answering the rows that finish included.
    decode_ns: AtomicU64,
    /// From the model's answer to the response's JSON: detokenizing, building it.
    respond_ns: AtomicU64,
}

fn add(counter: &AtomicU64, since: Instant) {
    counter.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

impl Timings {
    fn report(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (requests, batches) = (get(&self.requests), get(&self.batches));
        let steps = get(&self.steps);
        let mean_ms = |c: &AtomicU64, n: u64| get(c) as f64 / 1e6 / n.max(1) as f64;
        json!({
            "requests": requests,
            "batches": batches,
            "mean_batch_rows": get(&self.batched_rows) as f64 / batches.max(1) as f64,
            "mean_ms_per_request": {
                "read": mean_ms(&self.read_ns, requests),
                "prepare": mean_ms(&self.prepare_ns, requests),
                "queue": mean_ms(&self.queue_ns, requests),
                "respond": mean_ms(&self.respond_ns, requests),
            },
            "joined_rows": get(&self.joined_rows),
            "decode_steps": steps,
            "mean_step_rows": get(&self.step_rows) as f64 / steps.max(1) as f64,
            "mean_ms_per_batch": {"prefill": mean_ms(&self.prefill_ns, batches)},
            "mean_ms_per_step": {"decode": mean_ms(&self.decode_ns, steps)},
            "total_ms": {
                "read": get(&self.read_ns) as f64 / 1e6,
                "prepare": get(&self.prepare_ns) as f64 / 1e6,
                "queue": get(&self.queue_ns) as f64 / 1e6,
                "prefill": get(&self.prefill_ns) as f64 / 1e6,
                "decode": get(&self.decode_ns) as f64 / 1e6,
                "respond": get(&self.respond_ns) as f64 / 1e6,
            },
        })
    }
}

/// The bounded queue between connection threads and the model worker.
struct Queue {
    jobs: Mutex<Pending>,
    ready: Condvar,
    capacity: usize,
    /// Requests read in full and being prepared (JSON, image, tokens) by their connection
    /// threads: they will be queued within a few milliseconds, so a batch waits for them.
    preparing: AtomicUsize,
}

struct Pending {
    jobs: VecDeque<Job>,
    /// When the latest job arrived.
    last_arrival: Instant,
}

impl Queue {
    fn new(capacity: usize) -> Self {
        Self {
            jobs: Mutex::new(Pending {
                jobs: VecDeque::new(),
                last_arrival: Instant::now(),
            }),
            ready: Condvar::new(),
            capacity: capacity.max(1),
            preparing: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, job: Job) -> Result<(), Job> {
        let mut q = self.lock();
        if q.jobs.len() >= self.capacity {
            return Err(job);
        }
        q.jobs.push_back(job);
        q.last_arrival = Instant::now();
        self.ready.notify_one();
        Ok(())
    }

    fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    /// A request's preparation started (`true`) or ended, queued or refused (`false`).
    fn preparing(&self, started: bool) {
        if started {
            self.preparing.fetch_add(1, Ordering::SeqCst);
        } else {
            self.preparing.fetch_sub(1, Ordering::SeqCst);
            // The worker may be holding a batch open for this request.
            self.ready.notify_one();
        }
    }

    /// Blocks for the first job, then takes up to `max` of what waits, without holding the
    /// batch open (a decode is running: the jobs that come meanwhile make the next batch).
    fn take_waiting(&self, max: usize) -> Vec<Job> {
        let mut q = self.lock();
        while q.jobs.is_empty() {
            q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        let n = q.jobs.len().min(max);
        q.jobs.drain(..n).collect()
    }

    /// Blocks for the first job, then gathers up to `max` of them. The batch stays open while
    /// requests keep coming: until `wait` has passed since the latest arrival with none being
    /// prepared, and `max * wait` at most. Timing from the latest arrival rather than the
    /// first keeps a burst of clients together (clients answered by one batch come back
    /// together, a few milliseconds apart), where a fixed window from the first splits them
    /// into two half batches that then alternate for good.
    fn take_batch(&self, max: usize, wait: Duration) -> Vec<Job> {
        let mut q = self.lock();
        while q.jobs.is_empty() {
            q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        let cap = Instant::now() + wait * max as u32;
        while q.jobs.len() < max {
            let now = Instant::now();
            let quiet = q.last_arrival + wait;
            let coming = self.preparing.load(Ordering::SeqCst) > 0;
            let until = if coming { cap } else { quiet.min(cap) };
            if now >= until {
                break;
            }
            q = self
                .ready
                .wait_timeout(q, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let n = q.jobs.len().min(max);
        q.jobs.drain(..n).collect()
    }
}

/// The server: the model, its queue and the settings.
pub struct Server {
    vlm: Arc<Vlm>,
    config: ServeConfig,
    queue: Arc<Queue>,
    slots: Slots,
    next_id: AtomicU64,
    timings: Timings,
}

impl Server {
    pub fn new(vlm: Vlm, config: ServeConfig) -> Arc<Self> {
        Arc::new(Self {
            vlm: Arc::new(vlm),
            queue: Arc::new(Queue::new(config.queue_size)),
            slots: Slots::new(config.max_batch),
            config,
            next_id: AtomicU64::new(0),
            timings: Timings::default(),
        })
    }

    /// Serves `listener` until the process ends: the prompt passes on one thread, the decode on
    /// another, one thread per connection.
    pub fn run(self: &Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let (tx, rx) = mpsc::channel();
        let prefiller = self.clone();
        std::thread::spawn(move || prefiller.prefill_loop(tx));
        let decoder = self.clone();
        std::thread::spawn(move || decoder.decode_loop(rx));
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let server = self.clone();
            std::thread::spawn(move || server.connection(stream));
        }
        Ok(())
    }

    /// The prompt passes: takes queued requests as rows free up in the decode, runs them in one
    /// batched pass and hands the filled cache to the decode thread, which merges it between
    /// two steps. While a pass runs the next requests queue up, so passes batch by themselves:
    /// with a decode running this thread takes whatever waits (at least one request); with
    /// none it holds a batch open as `Queue::take_batch` says. It runs beside the decode, on
    /// the other core, so a pass no longer stops every running row.
    fn prefill_loop(&self, admitted: mpsc::Sender<Admission>) {
        loop {
            let (free, idle) = self.slots.wait_free();
            let jobs = if idle {
                self.queue.take_batch(free, self.config.batch_wait)
            } else {
                self.queue.take_waiting(free)
            };
            self.slots.take(jobs.len());
            let start = Instant::now();
            let mut prompts = Vec::with_capacity(jobs.len());
            let mut rows = Vec::with_capacity(jobs.len());
            for job in jobs {
                self.timings
                    .queue_ns
                    .fetch_add((start - job.queued).as_nanos() as u64, Ordering::Relaxed);
                prompts.push(job.prompt);
                rows.push((job.reply, job.max_tokens));
            }
            let n = rows.len();
            if !idle {
                self.timings
                    .joined_rows
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            let prefilled = self.vlm.prefill(&prompts);
            add(&self.timings.prefill_ns, start);
            self.timings.batches.fetch_add(1, Ordering::Relaxed);
            self.timings
                .batched_rows
                .fetch_add(n as u64, Ordering::Relaxed);
            match prefilled {
                Ok(prefill) => {
                    if let Err(mpsc::SendError(a)) = admitted.send(Admission { prefill, rows }) {
                        fail(a.rows.into_iter().map(|r| r.0), "the decode thread stopped");
                        return;
                    }
                }
                Err(e) => {
                    fail(
                        rows.into_iter().map(|r| r.0),
                        &format!("generation failed: {e}"),
                    );
                    self.slots.release(n);
                }
            }
        }
    }

    /// The decode: one running greedy decode. Between its steps it merges the rows the prompt
    /// thread has filled; each step answers the rows that finished at once (no request waits
    /// for a longer answer than its own) and frees their slots.
    fn decode_loop(&self, admitted: mpsc::Receiver<Admission>) {
        let lm = self.vlm.language_model();
        let eos = self.vlm.stop_ids();
        let mut running: RunningDecode<mpsc::Sender<Answer>> = RunningDecode::new();
        loop {
            if running.is_empty() {
                let Ok(a) = admitted.recv() else { return };
                self.admit(&mut running, a);
            }
            while let Ok(a) = admitted.try_recv() {
                self.admit(&mut running, a);
            }
            if running.is_empty() {
                continue;
            }
            let start = Instant::now();
            let rows = running.len();
            let mut done = 0;
            let stepped = running.step(lm, eos, |reply, ids| {
                let _ = reply.send(Ok(ids));
                done += 1;
            });
            if let Err(e) = stepped {
                let lost = running.abandon();
                done += lost.len();
                fail(lost.into_iter(), &format!("generation failed: {e}"));
            }
            self.slots.release(done);
            add(&self.timings.decode_ns, start);
            self.timings.steps.fetch_add(1, Ordering::Relaxed);
            self.timings
                .step_rows
                .fetch_add(rows as u64, Ordering::Relaxed);
        }
    }

    fn admit(&self, running: &mut RunningDecode<mpsc::Sender<Answer>>, a: Admission) {
        let n = a.rows.len();
        // The rows match the prompts they were filled from; an error here is a bug, answered
        // rather than lost: the rows' senders are dropped with it, which answers them 500.
        if let Err(e) = running.admit(a.prefill, a.rows) {
            eprintln!("misp serve: admitting {n} rows: {e}");
            self.slots.release(n);
        }
    }

    /// Serves the requests of one connection until the client closes it, asks to, lets it idle
    /// past the read timeout, or sends a request that cannot be read to its end.
    fn connection(&self, stream: TcpStream) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
        let _ = stream.set_nodelay(true);
        let Ok(read) = stream.try_clone() else { return };
        let mut reader = BufReader::new(read);
        let mut writer = stream;
        loop {
            // Wait for the next request's first byte outside the timings: an idle persistent
            // connection is not a slow read.
            match reader.fill_buf() {
                Ok([]) | Err(_) => break,
                Ok(_) => {}
            }
            let start = Instant::now();
            let limit = self.config.max_body;
            let (status, body, keep_alive) = match read_request(&mut reader, &mut writer, limit) {
                Ok(None) => break,
                Ok(Some(req)) => {
                    add(&self.timings.read_ns, start);
                    let answer = match self.route(&req.method, &req.path, &req.body) {
                        Ok(v) => (200, v),
                        Err(e) => (e.status, error_body(e.status, &e.message)),
                    };
                    (answer.0, answer.1, req.keep_alive)
                }
                // The rest of the request is unread: the connection cannot go on.
                Err(e) => (e.status, error_body(e.status, &e.message), false),
            };
            if write_json(&mut writer, status, &body, keep_alive).is_err() || !keep_alive {
                break;
            }
        }
        let _ = writer.shutdown(std::net::Shutdown::Both);
    }

    fn route(&self, method: &str, path: &str, body: &[u8]) -> Result<Value, HttpError> {
        match (method, path.trim_end_matches('/')) {
            ("GET", "/health") => Ok(json!({
                "status": "ok",
                "queued": self.queue.len(),
                "timings": self.timings.report(),
            })),
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
        self.queue.preparing(true);
        let queued = self.enqueue(body);
        self.queue.preparing(false);
        let (rx, prompt_tokens) = queued?;
        let ids = rx
            .recv()
            .map_err(|_| HttpError::new(500, "the model worker stopped"))?
            .map_err(|e| HttpError::new(500, e))?;
        self.reply(ids, prompt_tokens)
    }

    /// Prepares a chat request and queues it; the channel of its answer and its prompt's
    /// length.
    fn enqueue(&self, body: &[u8]) -> Result<(mpsc::Receiver<Answer>, usize), HttpError> {
        let start = Instant::now();
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
        add(&self.timings.prepare_ns, start);
        let job = Job {
            prompt,
            max_tokens: chat.max_tokens,
            queued: Instant::now(),
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
        Ok((rx, prompt_tokens))
    }

    /// The OpenAI chat-completion body of an answer.
    fn reply(&self, ids: Vec<u32>, prompt_tokens: usize) -> Result<Value, HttpError> {
        let answered = Instant::now();
        let text = self
            .vlm
            .decode(&ids)
            .map_err(|e| HttpError::new(500, format!("decoding the answer: {e}")))?;
        let stopped = ids.last().is_some_and(|t| self.vlm.stop_ids().contains(t));
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let reply = json!({
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
        });
        add(&self.timings.respond_ns, answered);
        self.timings.requests.fetch_add(1, Ordering::Relaxed);
        Ok(reply)
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
            // Line breaks inside the base64 are allowed; copying only when there are any keeps
            // a char-by-char pass off every request (it was 2 % of the server's profile).
            let decoded = if data.bytes().any(|b| b.is_ascii_whitespace()) {
                let clean: Vec<u8> = data.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
                base64::decode(clean)
            } else {
                base64::decode(data)
            };
            return decoded
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
                        Some("video_url" | "video") => {
                            return Err(bad(format!(
                                "messages[{i}].content[{j}]: video inputs are not supported (text, image_url)"
                            )))
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
        let q = Queue::new(3);
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
    fn a_running_decode_takes_what_waits_within_the_free_slots() {
        let q = Queue::new(8);
        for n in 0..3 {
            assert!(q.push(job(n)).is_ok());
        }
        // No batch held open: what waits, up to the free slots, at once.
        let got = q.take_waiting(2);
        assert_eq!(got.iter().map(|j| j.max_tokens).collect::<Vec<_>>(), [0, 1]);
        // The one left; then, the queue empty, the next call blocks for the next arrival.
        let got = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                assert!(q.push(job(3)).is_ok());
            });
            let mut got = q.take_waiting(8);
            if got.len() == 1 {
                got.extend(q.take_waiting(8));
            }
            got
        });
        assert_eq!(got.iter().map(|j| j.max_tokens).collect::<Vec<_>>(), [2, 3]);

        // Slots: taken by the prompt thread, freed by the decode; a full decode blocks the
        // prompt thread until rows finish.
        let slots = Slots::new(4);
        assert_eq!(slots.wait_free(), (4, true));
        slots.take(3);
        assert_eq!(slots.wait_free(), (1, false));
        slots.take(1);
        let free = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                slots.release(2);
            });
            slots.wait_free()
        });
        assert_eq!(free, (2, false));
        slots.release(2);
        assert_eq!(slots.wait_free(), (4, true));
    }

    fn job(n: usize) -> Job {
        Job {
            prompt: PreparedPrompt {
                prompt_ids: vec![n as u32],
                pixels: vec![],
                grid: None,
            },
            max_tokens: n,
            queued: Instant::now(),
            reply: mpsc::channel().0,
        }
    }

    #[test]
    fn a_batch_stays_open_while_requests_keep_coming() {
        // Arrivals 120 ms apart with a 200 ms wait: a window from the first arrival would
        // close before the third; timed from the latest, all four make one batch.
        let q = Queue::new(8);
        q.push(job(0)).unwrap_or_else(|_| panic!("room"));
        let got = std::thread::scope(|s| {
            s.spawn(|| {
                for n in 1..4 {
                    std::thread::sleep(Duration::from_millis(120));
                    assert!(q.push(job(n)).is_ok());
                }
            });
            q.take_batch(4, Duration::from_millis(200))
        });
        assert_eq!(
            got.iter().map(|j| j.max_tokens).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );

        // A request still being prepared holds the batch open past the quiet wait.
        q.push(job(5)).unwrap_or_else(|_| panic!("room"));
        q.preparing(true);
        let got = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(250));
                assert!(q.push(job(6)).is_ok());
                q.preparing(false);
            });
            q.take_batch(4, Duration::from_millis(100))
        });
        assert_eq!(got.iter().map(|j| j.max_tokens).collect::<Vec<_>>(), [5, 6]);

        // Nothing coming: the batch goes after the quiet wait with what it has.
        q.push(job(7)).unwrap_or_else(|_| panic!("room"));
        let t = Instant::now();
        assert_eq!(q.take_batch(4, Duration::from_millis(20)).len(), 1);
        assert!(t.elapsed() < Duration::from_secs(5));
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
                {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]}]}),
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
        let video = json!({"messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]}]});
        let e = parse_chat(&video, &config()).unwrap_err();
        assert!(
            e.message.contains("video inputs are not supported"),
            "{}",
            e.message
        );
    }
}
