//! GGUF: our quantizers against gguf-py's (bit for bit) and, for the k-quants, which gguf-py
//! cannot quantize, against llama.cpp's ggml (bit for bit); our dequantizers on gguf-py's
//! dequantization of those bytes; the quantization error of each type, the container round trip,
//! and corrupted files.

use crate::common;

use std::path::Path;

use strata::gguf::{
    GgmlType, Metadata, TensorInfo, Value, ValueType, dequantize, quantize, read_header, write_gguf,
};

fn fixture_f32(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(common::fixture("gguf_quants").join(name)).unwrap();
    bytes
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

const TYPES: [(&str, GgmlType); 10] = [
    ("f16", GgmlType::F16),
    ("bf16", GgmlType::BF16),
    ("q8_0", GgmlType::Q8_0),
    ("q4_0", GgmlType::Q4_0),
    ("q4_1", GgmlType::Q4_1),
    ("q5_0", GgmlType::Q5_0),
    ("q5_1", GgmlType::Q5_1),
    // Quantized by ggml (scripts/fixtures/make_gguf_fixtures.py --ggml).
    ("q4_k", GgmlType::Q4_K),
    ("q5_k", GgmlType::Q5_K),
    ("q6_k", GgmlType::Q6_K),
];

#[test]
fn quantizers_match_gguf_py_bit_for_bit() {
    let input = fixture_f32("input.f32");
    for (name, ty) in TYPES {
        let want =
            std::fs::read(common::fixture("gguf_quants").join(format!("{name}.bin"))).unwrap();
        let got = quantize(ty, &input).unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(first, None, "{name}: first differing byte at {first:?}");
    }
}

#[test]
fn dequantizers_match_gguf_py_on_its_bytes() {
    for (name, ty) in TYPES {
        let bytes =
            std::fs::read(common::fixture("gguf_quants").join(format!("{name}.bin"))).unwrap();
        let want = fixture_f32(&format!("{name}.dequant.f32"));
        let got = dequantize(ty, &bytes).unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{name}[{i}]: {a} vs {b}"
            );
        }
    }
}

#[test]
fn quantization_error_is_what_each_type_allows() {
    // The 4096 weight-like values (normal, std 0.02); the edge-case blocks follow them.
    let input = &fixture_f32("input.f32")[..4096];
    let rms = |v: &[f32]| (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
    for (ty, bound) in [
        // f16: 11-bit significand; bf16: 8-bit; Q8_0: 8 bits per value with a shared scale;
        // Q4_0/Q4_1: 16 levels per block of 32 (relative RMS error ~ 1/(2·√3·7.5) for a
        // normal block spanning ±2.5σ, plus scale rounding); Q5: 32 levels, half that. The
        // k-quants fit each sub-block's scale and minimum by weighted least squares, so they
        // land below the block-32 types of the same bits.
        (GgmlType::F16, 5e-4),
        (GgmlType::BF16, 4e-3),
        (GgmlType::Q8_0, 1e-2),
        (GgmlType::Q4_0, 0.12),
        (GgmlType::Q4_1, 0.12),
        (GgmlType::Q5_0, 0.06),
        (GgmlType::Q5_1, 0.06),
        (GgmlType::Q4_K, 0.11),
        (GgmlType::Q5_K, 0.055),
        (GgmlType::Q6_K, 0.03),
    ] {
        let back = dequantize(ty, &quantize(ty, input).unwrap()).unwrap();
        let err: Vec<f32> = back.iter().zip(input).map(|(a, b)| a - b).collect();
        let relative = rms(&err) / rms(input);
        assert!(
            relative < bound,
            "{}: relative RMS error {relative}",
            ty.name()
        );
        assert!(
            relative > bound / 50.0,
            "{}: error {relative} is implausibly small",
            ty.name()
        );
    }
}

#[test]
fn partial_blocks_are_rejected() {
    let err = quantize(GgmlType::Q8_0, &[0.0; 40])
        .unwrap_err()
        .to_string();
    assert!(err.contains("q8_0") && err.contains("40"), "{err}");
}

fn sample_file(path: &Path) -> (Metadata, Vec<TensorInfo>, Vec<Vec<u8>>) {
    let metadata = vec![
        (
            "general.architecture".to_owned(),
            Value::String("llama".into()),
        ),
        ("general.alignment".to_owned(), Value::U32(64)),
        ("test.u8".to_owned(), Value::U8(7)),
        ("test.i8".to_owned(), Value::I8(-7)),
        ("test.u16".to_owned(), Value::U16(65535)),
        ("test.i16".to_owned(), Value::I16(-300)),
        ("test.i32".to_owned(), Value::I32(-70000)),
        ("test.f32".to_owned(), Value::F32(1e-5)),
        ("test.bool".to_owned(), Value::Bool(true)),
        ("test.u64".to_owned(), Value::U64(1 << 40)),
        ("test.i64".to_owned(), Value::I64(-(1 << 40))),
        ("test.f64".to_owned(), Value::F64(0.1)),
        (
            "test.strings".to_owned(),
            Value::Array(
                ValueType::String,
                vec![Value::String("a b".into()), Value::String("ü".into())],
            ),
        ),
        (
            "test.empty".to_owned(),
            Value::Array(ValueType::I32, vec![]),
        ),
    ];
    let mut tensors = Vec::new();
    let mut data = Vec::new();
    for (i, ty) in GgmlType::ALL.into_iter().enumerate() {
        let (cols, rows) = (256, 3 + i); // one k-quant super-block per row
        let values: Vec<f32> = (0..cols * rows)
            .map(|j| ((j * 37 + i) % 101) as f32 / 50.0 - 1.0)
            .collect();
        tensors.push(TensorInfo {
            name: format!("t{i}.{}", ty.name()),
            dims: vec![cols as u64, rows as u64],
            ty,
        });
        data.push(quantize(ty, &values).unwrap());
    }
    let bytes = data.clone();
    write_gguf(path, &metadata, &tensors, |i| Ok(bytes[i].clone())).unwrap();
    (metadata, tensors, data)
}

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("strata-gguf-{name}-{}.gguf", std::process::id()))
}

#[test]
fn written_files_read_back_with_alignment_honoured() {
    let path = temp("roundtrip");
    let (metadata, tensors, data) = sample_file(&path);
    let bytes = std::fs::read(&path).unwrap();
    let header = read_header(&bytes, &path).unwrap();
    assert_eq!(header.version, 3);
    assert_eq!(header.alignment, 64);
    assert_eq!(header.metadata, metadata);
    assert_eq!(header.tensors.len(), tensors.len());
    for (i, ((info, start), want)) in header.tensors.iter().zip(&tensors).enumerate() {
        assert_eq!(info, want);
        assert_eq!(start % 64, 0, "tensor {i} is not aligned");
        assert_eq!(header.tensor_bytes(&bytes, i).unwrap(), &data[i][..]);
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn corrupted_files_give_errors_never_panics() {
    let path = temp("corrupt");
    sample_file(&path);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    // Every truncation before the end of the last tensor's data (what follows is alignment
    // padding): the last tensor no longer fits, or the header itself is cut.
    let header = read_header(&bytes, &path).unwrap();
    let (last, start) = header.tensors.last().unwrap();
    let data_end = *start as usize + last.bytes().unwrap();
    for len in 0..data_end {
        let result = read_header(&bytes[..len], &path);
        assert!(
            result.is_err(),
            "a file cut at {len} of {} bytes was accepted",
            bytes.len()
        );
    }
    let err = read_header(&bytes[..data_end - 1], &path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not fit") && err.contains(&path.display().to_string()),
        "{err}"
    );
    let err = read_header(&bytes[..200], &path).unwrap_err().to_string();
    assert!(err.contains("truncated"), "{err}");
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert!(
        read_header(&bad, &path)
            .unwrap_err()
            .to_string()
            .contains("not a GGUF file")
    );
    // Random byte changes anywhere in the header: any outcome but a panic.
    let mut state = 0x2545f4914f6cdd1du64;
    let header_len = header.tensors[0].1 as usize;
    for _ in 0..3000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut bad = bytes.clone();
        let at = (state % header_len as u64) as usize;
        bad[at] = (state >> 32) as u8;
        if let Ok(header) = read_header(&bad, &path) {
            for i in 0..header.tensors.len() {
                let _ = header.tensor_bytes(&bad, i);
            }
        }
    }
}

#[test]
fn tensor_data_of_the_wrong_size_is_an_error_and_leaves_no_file() {
    let path = temp("wrong-size");
    let tensors = vec![TensorInfo {
        name: "w".into(),
        dims: vec![32, 2],
        ty: GgmlType::Q8_0,
    }];
    let err = write_gguf(&path, &[], &tensors, |_| Ok(vec![0u8; 10]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("tensor w") && err.contains("68"), "{err}");
    assert!(!path.exists());
}
