//! `misp serve` end to end on the tiny random LLaVA of `fixtures/llava_chat/tiny`, loopback
//! only: concurrent chat requests get the same greedy answers as `misp generate` on the same
//! inputs, also one after another on a persistent connection; bad requests get the documented
//! statuses; and `misp eval mmhal` talks to it as its judge: the tiny model's 64-position
//! context cannot hold a judge prompt (the server refuses it with 400 and the run stops with
//! that error, nothing scored), and a copy of it whose context can is a real judge whose every
//! reply is accounted for and cached.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

mod common;
use common::{json_file, jsonl, misp, ok, s, tmp_dir, IMAGES, MODEL, ROOT};

fn root() -> PathBuf {
    PathBuf::from(ROOT)
}

/// A `misp serve` child, killed when dropped.
struct Served {
    child: Child,
    port: u16,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(extra: &[&str]) -> Served {
    serve_model(MODEL, extra)
}

fn serve_model(model: &str, extra: &[&str]) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_misp"))
        .args([
            "serve",
            "--model",
            model,
            "--port",
            "0",
            "--image-root",
            IMAGES,
        ])
        .args(extra)
        .current_dir(ROOT)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start misp serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    Served { child, port }
}

/// One raw HTTP request on its own connection, closed by the reply; `(status, body)`.
fn request(port: u16, method: &str, path: &str, headers: &str, body: &[u8]) -> (u16, Value) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Chat requests one after another on one persistent connection (HTTP/1.1's default), each
/// response read by its Content-Length; `(status, Connection header, body)` of each.
fn on_one_connection(port: u16, bodies: &[Vec<u8>]) -> Vec<(u16, String, Value)> {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut writer = s;
    bodies
        .iter()
        .map(|body| {
            let head = format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            writer.write_all(head.as_bytes()).unwrap();
            writer.write_all(body).unwrap();
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let status = line[9..12].parse().unwrap();
            let (mut length, mut connection) = (0usize, String::new());
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                if h == "\r\n" {
                    break;
                }
                let (name, value) = h.split_once(':').unwrap();
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap(),
                    "connection" => connection = value.trim().to_string(),
                    _ => {}
                }
            }
            let mut text = vec![0u8; length];
            reader.read_exact(&mut text).unwrap();
            (status, connection, serde_json::from_slice(&text).unwrap())
        })
        .collect()
}

fn data_url(name: &str) -> String {
    let bytes = std::fs::read(root().join(IMAGES).join(name)).unwrap();
    let mime = if name.ends_with(".png") {
        "image/png"
    } else {
        "image/jpeg"
    };
    // Base64 by hand: the test must not reuse the server's decoder to check it.
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= c.len() {
                out.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    format!("data:{mime};base64,{out}")
}

fn chat(image_url: &str, prompt: &str, max_tokens: usize) -> Vec<u8> {
    json!({"model": "tiny", "temperature": 0, "max_tokens": max_tokens, "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": prompt},
            {"type": "image_url", "image_url": {"url": image_url}},
        ]}
    ]})
    .to_string()
    .into_bytes()
}

#[test]
fn concurrent_requests_get_the_greedy_answers_of_misp_generate() {
    let cases = [
        ("hopper.jpg", "Is there a person?"),
        ("camera_gray.png", "What is this?"),
        ("astronaut_small.png", "Describe it."),
        ("coffee_cmyk.jpg", "Is there a cup?"),
        ("chelsea_rgba.png", "Is there a cat?"),
        ("hopper.jpg", "What colour?"),
    ];
    let dir = tmp_dir("serve", "generate");
    let rows: String = cases
        .iter()
        .enumerate()
        .map(|(i, (img, p))| {
            format!(
                "{}\n",
                json!({"id": i, "image": root().join(IMAGES).join(img), "prompt": p})
            )
        })
        .collect();
    std::fs::write(dir.join("in.jsonl"), rows).unwrap();
    let out = dir.join("out.jsonl");
    ok(misp(&[
        "generate",
        "--model",
        MODEL,
        "--data",
        s(&dir.join("in.jsonl")),
        "--out",
        s(&out),
        "--max-new-tokens",
        "6",
        "--quiet",
    ]));
    // generate times its own answering, model loading apart (what bench/serve compares with).
    let timings = &json_file(&dir.join("out.jsonl.config.json"))["timings"];
    assert_eq!(
        timings["rows"].as_u64(),
        Some(cases.len() as u64),
        "{timings}"
    );
    let (load, answer) = (&timings["load_s"], &timings["generate_s"]);
    assert!(
        load.as_f64().unwrap() > 0.0 && answer.as_f64().unwrap() > 0.0,
        "{timings}"
    );
    let rate = timings["rows_per_s"].as_f64().unwrap();
    assert!(
        (rate * answer.as_f64().unwrap() - cases.len() as f64).abs() < 1e-6,
        "{timings}"
    );
    // Its CPU time too, where /proc says it (Linux); never negative.
    let cpu = &timings["cpu_s"];
    assert!(
        cpu.as_f64().is_some_and(|c| c >= 0.0) || (cpu.is_null() && !cfg!(target_os = "linux")),
        "{timings}"
    );
    let want: Vec<String> = jsonl(&out)
        .iter()
        .map(|r| r["text"].as_str().unwrap().to_string())
        .collect();

    let served = serve(&["--batch-size", "4", "--batch-wait-ms", "50"]);
    let port = served.port;
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, (img, p))| {
                // Half as data: URLs, half as paths under --image-root.
                let url = if i % 2 == 0 {
                    data_url(img)
                } else {
                    img.to_string()
                };
                s.spawn(move || {
                    request(port, "POST", "/v1/chat/completions", "", &chat(&url, p, 6))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, ((status, body), want)) in answers.iter().zip(&want).enumerate() {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(
            body["choices"][0]["message"]["content"],
            *want.as_str(),
            "request {i}"
        );
        assert_eq!(body["object"], "chat.completion");
        assert!(body["usage"]["completion_tokens"].as_u64().unwrap() <= 6);
    }
    let (status, models) = request(port, "GET", "/v1/models", "", b"");
    assert_eq!(
        (status, models["data"][0]["id"].as_str()),
        (200, Some("tiny"))
    );
    // The same requests again, one after another on one persistent connection.
    let bodies: Vec<Vec<u8>> = cases
        .iter()
        .map(|(img, p)| chat(&data_url(img), p, 6))
        .collect();
    let kept = on_one_connection(port, &bodies);
    for (i, ((status, connection, body), want)) in kept.iter().zip(&want).enumerate() {
        assert_eq!(
            (*status, connection.as_str()),
            (200, "keep-alive"),
            "{body}"
        );
        assert_eq!(
            body["choices"][0]["message"]["content"],
            *want.as_str(),
            "request {i} on the kept connection"
        );
    }
    let (status, health) = request(port, "GET", "/health", "", b"");
    assert_eq!(status, 200);
    let timings = &health["timings"];
    assert_eq!(
        timings["requests"].as_u64(),
        Some(2 * cases.len() as u64),
        "{health}"
    );
    let batches = timings["batches"].as_u64().unwrap();
    assert!((1..=2 * cases.len() as u64).contains(&batches), "{health}");
    for stage in ["prefill", "decode"] {
        assert!(
            timings["total_ms"][stage].as_f64().unwrap() > 0.0,
            "{health}"
        );
    }
    // Six-token answers (or shorter, at a stop id): at most six steps per request.
    let steps = timings["decode_steps"].as_u64().unwrap();
    assert!(
        (1..=6 * 2 * cases.len() as u64).contains(&steps),
        "{health}"
    );
}

/// Greedy answers of `misp generate` on `model` for `(image, prompt, max_new_tokens)` cases:
/// one run per distinct length, each case's answer from the run of its own.
fn generate_answers(model: &str, cases: &[(&str, &str, usize)], tag: &str) -> Vec<String> {
    let dir = tmp_dir("serve", tag);
    let mut want = vec![String::new(); cases.len()];
    let mut lengths: Vec<usize> = cases.iter().map(|c| c.2).collect();
    lengths.sort_unstable();
    lengths.dedup();
    for n in lengths {
        let rows: String = cases
            .iter()
            .enumerate()
            .map(|(i, (img, p, _))| {
                format!(
                    "{}\n",
                    json!({"id": i, "image": root().join(IMAGES).join(img), "prompt": p})
                )
            })
            .collect();
        let (data, out) = (
            dir.join(format!("in{n}.jsonl")),
            dir.join(format!("out{n}.jsonl")),
        );
        std::fs::write(&data, rows).unwrap();
        let max = n.to_string();
        ok(misp(&[
            "generate",
            "--model",
            model,
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--max-new-tokens",
            &max,
            "--quiet",
        ]));
        for (i, r) in jsonl(&out).iter().enumerate() {
            if cases[i].2 == n {
                want[i] = r["text"].as_str().unwrap().to_string();
            }
        }
    }
    want
}

/// Continuous batching: requests sent a few milliseconds apart join the decode the first one
/// started (the server counts them in `joined_rows`), with prompts of different lengths and
/// different `max_tokens` sharing the batch and leaving it at different steps; every answer is
/// `misp generate`'s. Rounds repeat until rows have joined a running decode (the first round
/// almost always), so a slow machine cannot make the case pass without exercising it.
fn requests_joining_a_running_decode_get_the_answers_of_misp_generate(model: &str, tag: &str) {
    let cases: [(&str, &str, usize); 5] = [
        // The first (the one the others join) has the longest prompt, its image the largest
        // (Qwen2.5-VL's image tokens follow the size): the rows joining it are left-padded.
        ("hopper.jpg", "Describe the picture in detail, please.", 24),
        ("astronaut_small.png", "Is there a person?", 2),
        ("camera_gray.png", "What is it?", 9),
        (
            "chelsea_rgba.png",
            "Is there a cat sitting on the mat next to the door?",
            5,
        ),
        ("coffee_cmyk.jpg", "Cup?", 16),
    ];
    let want = generate_answers(model, &cases, tag);
    let served = serve_model(model, &["--batch-size", "8", "--batch-wait-ms", "0"]);
    let port = served.port;
    let mut joined = 0;
    for round in 0..5 {
        let answers: Vec<(u16, Value)> = std::thread::scope(|sc| {
            let handles: Vec<_> = cases
                .iter()
                .enumerate()
                .map(|(i, &(img, p, max))| {
                    sc.spawn(move || {
                        // The longest answer first, the others while it decodes.
                        std::thread::sleep(Duration::from_millis(3 * i as u64));
                        request(port, "POST", "/v1/chat/completions", "", &chat(img, p, max))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, ((status, body), want)) in answers.iter().zip(&want).enumerate() {
            assert_eq!(*status, 200, "{body}");
            assert_eq!(
                body["choices"][0]["message"]["content"],
                *want.as_str(),
                "round {round}, request {i}"
            );
            let tokens = body["usage"]["completion_tokens"].as_u64().unwrap();
            assert!(
                (1..=cases[i].2 as u64).contains(&tokens),
                "request {i}: {body}"
            );
        }
        let (_, health) = request(port, "GET", "/health", "", b"");
        joined = health["timings"]["joined_rows"].as_u64().unwrap();
        if joined > 0 {
            break;
        }
    }
    assert!(joined > 0, "no request joined a running decode in 5 rounds");
}

#[test]
fn llava_requests_joining_a_running_decode_get_the_answers_of_misp_generate() {
    requests_joining_a_running_decode_get_the_answers_of_misp_generate(MODEL, "join-llava");
}

#[test]
fn qwen_requests_joining_a_running_decode_get_the_answers_of_misp_generate() {
    requests_joining_a_running_decode_get_the_answers_of_misp_generate(
        "fixtures/qwen2_5_vl/tiny",
        "join-qwen",
    );
}

#[test]
fn bad_requests_get_clear_statuses() {
    let served = serve(&["--max-body-mb", "1"]);
    let port = served.port;
    let (status, body) = request(
        port,
        "POST",
        "/v1/chat/completions",
        "",
        b"{\"messages\": [",
    );
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not JSON"),
        "{body}"
    );
    // Over the body limit: refused on the header, before the body is read.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    let (status, body) = request(
        port,
        "POST",
        "/v1/chat/completions",
        "",
        &chat("../../Cargo.toml", "Hi?", 2),
    );
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("escapes"),
        "{body}"
    );
    let (status, _) = request(
        port,
        "POST",
        "/v1/chat/completions",
        "",
        &chat("missing.png", "Hi?", 2),
    );
    assert_eq!(status, 400);
    assert_eq!(request(port, "GET", "/nope", "", b"").0, 404);
    let long = "word ".repeat(200);
    let (status, body) = request(
        port,
        "POST",
        "/v1/chat/completions",
        "",
        &chat(&data_url("hopper.jpg"), &long, 2),
    );
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("context"),
        "{body}"
    );
}

/// Reads from `s` until the bytes read hold `end` (or the peer closes); what was read.
fn read_until(s: &mut TcpStream, end: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(end) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "reading the reply: {e} (read so far: {:?})",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn expect_100_continue_gets_the_go_ahead_and_an_oversized_body_gets_413_unread() {
    let served = serve(&["--max-body-mb", "1"]);
    // What curl does for a body over 1 KiB: the head with `Expect: 100-continue`, then the
    // body only after the server's `100 Continue` (curl gives up waiting after a second).
    // The base64 wrapped in lines of 76, as MIME encoders write it: whitespace is skipped.
    let url = data_url("hopper.jpg");
    let (head, b64) = url.split_once(',').unwrap();
    let lines: Vec<String> = b64
        .as_bytes()
        .chunks(76)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    let body = chat(
        &format!("{head},{}", lines.join("\r\n")),
        "Is there a person?",
        2,
    );
    assert!(body.len() > 1024);
    let mut s = TcpStream::connect(("127.0.0.1", served.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    // Nothing of the body sent yet: the interim response must come on the head alone.
    let interim = read_until(&mut s, "\r\n\r\n");
    assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(&body).unwrap();
    let mut rest = String::new();
    s.read_to_string(&mut rest).unwrap();
    assert!(rest.starts_with("HTTP/1.1 200 OK\r\n"), "{rest}");
    let reply: Value = serde_json::from_str(rest.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(reply["object"], "chat.completion", "{reply}");

    // Over the limit: 413 on the head, no go-ahead, and the body is never asked for.
    let mut s = TcpStream::connect(("127.0.0.1", served.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2000000\r\n\r\n",
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
        "{text}"
    );
    assert!(!text.contains("100 Continue"), "{text}");
    assert!(text.contains("over the limit of 1048576 bytes"), "{text}");
}

#[test]
fn judged_runs_talk_to_misp_serve_and_stop_on_its_errors() {
    let served = serve(&[]);
    let url = format!("http://127.0.0.1:{}/v1", served.port);
    let dir = tmp_dir("serve", "judged");
    let fixture = root().join("fixtures/mmhal/response.json");
    let out = dir.join("mmhal");
    let o = misp(&[
        "eval",
        "mmhal",
        "--questions",
        s(&fixture),
        "--answers",
        s(&fixture),
        "--out",
        s(&out),
        "--judge-url",
        &url,
        "--judge-model",
        "tiny",
        "--judge-retries",
        "1",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("16 of 16 judge requests failed")
            && err.contains("HTTP 400")
            && err.contains("context"),
        "{err}"
    );
    let config = json_file(&out.join("config.json"));
    assert_eq!(config["command"], "eval mmhal");
    assert_eq!(config["judge_url"], url.as_str());
}

/// The tiny LLaVA with a context long enough for MMHal-Bench's judge prompt (about 5,200 of
/// its tokens): LLaMA's positions are rotary, so raising `max_position_embeddings` changes no
/// weight, only how long a prompt the checkpoint admits.
fn long_context_model(dir: &Path) -> PathBuf {
    let model = dir.join("tiny-long");
    std::fs::create_dir_all(&model).unwrap();
    for entry in std::fs::read_dir(root().join(MODEL)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    let path = model.join("config.json");
    let mut config = json_file(&path);
    config["text_config"]["max_position_embeddings"] = json!(8192);
    std::fs::write(&path, config.to_string()).unwrap();
    model
}

#[test]
fn mmhal_judged_by_a_real_misp_serve_accounts_for_every_reply_and_reruns_from_the_cache() {
    let dir = tmp_dir("serve", "mmhal_real_judge");
    let model = long_context_model(&dir);
    // Three of the fixture's questions, with its model answers: three judge prompts.
    let all = json_file(&root().join("fixtures/mmhal/response.json"))
        .as_array()
        .unwrap()
        .clone();
    let questions = dir.join("questions.json");
    std::fs::write(&questions, Value::Array(all[..3].to_vec()).to_string()).unwrap();
    let out = dir.join("out");
    let _ = std::fs::remove_dir_all(&out);
    let served = serve_model(
        s(&model),
        &["--batch-size", "1", "--default-max-tokens", "8"],
    );
    let url = format!("http://127.0.0.1:{}/v1", served.port);
    let args = [
        "eval",
        "mmhal",
        "--questions",
        s(&questions),
        "--answers",
        s(&questions),
        "--out",
        s(&out),
        "--judge-url",
        &url,
        "--judge-model",
        "tiny",
        "--judge-retries",
        "0",
    ];
    let first = misp(&args);
    let err = String::from_utf8_lossy(&first.stderr).to_string();

    // Every question was judged by the server: one reply each, cached as it arrived, and the
    // rating either parsed (0-6) or recorded as missing, never invented.
    let cached = std::fs::read_dir(out.join("judge_cache")).unwrap().count();
    assert_eq!(cached, 3, "{err}");
    let answers = jsonl(&out.join("answers.jsonl"));
    assert_eq!(answers.len(), 3, "{err}");
    let unrated = answers.iter().filter(|a| a["rating"].is_null()).count();
    for a in &answers {
        assert!(
            a["rating"].is_null() || a["rating"].as_u64().is_some_and(|r| r <= 6),
            "{a}"
        );
        assert!(a["judge_reply"].is_string(), "{a}");
    }
    let excluded = json_file(&out.join("excluded.json"));
    assert_eq!(excluded["unrated"].as_u64(), Some(unrated as u64));
    if unrated == 3 {
        // A random judge writes no rating: nothing to average, said, not scored as 0.
        assert!(!first.status.success());
        assert!(
            err.contains("none of the 3 judge replies holds a rating"),
            "{err}"
        );
    } else {
        assert!(first.status.success(), "{err}");
        let metrics = json_file(&out.join("metrics.json"));
        assert_eq!(metrics["mmhal"]["n"].as_u64(), Some(3 - unrated as u64));
        assert_eq!(metrics["mmhal"]["unrated"].as_u64(), Some(unrated as u64));
        assert!(err.contains("0 from the cache, 3 requests"), "{err}");
    }

    // The server gone, a re-run still has every reply: it makes no judge call at all (one
    // would fail at once with --judge-retries 0) and ends as the first run did.
    drop(served);
    let again = misp(&args);
    let err2 = String::from_utf8_lossy(&again.stderr).to_string();
    assert_eq!(again.status.success(), first.status.success(), "{err2}");
    assert!(!err2.contains("judge requests failed"), "{err2}");
    assert_eq!(jsonl(&out.join("answers.jsonl")), answers);
    if again.status.success() {
        assert!(err2.contains("3 from the cache, 0 requests"), "{err2}");
    }
}
