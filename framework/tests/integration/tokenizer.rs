//! A Hugging Face tokenizer.json through our loader gives the ids the Python `tokenizers`
//! library gave (fixture from scripts/fixtures/make_hf_fixtures.py).

use std::path::Path;

use strata::tokenizer::{HfTokenizer, Tokenizer};

#[test]
fn hf_tokenizer_matches_python() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer");
    let tok = HfTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    for case in expected.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text).unwrap(), want, "{text}");
        assert_eq!(tok.decode(&want).unwrap(), text);
    }
    assert_eq!(tok.bos_id(), Some(0));
    assert_eq!(tok.eos_id(), Some(1));
    assert_eq!(tok.pad_id(), Some(2));
}
