//! Published weights files (`runtime/src/weights`): GGUF tensors dequantize
//! to the values llama.cpp's own Python package gives, a sharded safetensors
//! checkpoint reads as one, and damaged or unsupported files are errors
//! that name the file and what is wrong. The fixtures and the script that
//! wrote them are in `tests/fixtures/weights/`.

use std::path::Path;
use tessera::runtime::weights::{Format, WeightFile, gguf::Value};

const DIR: &str = "tests/fixtures/weights";

/// Every tensor of a safetensors file, read with the `safetensors` crate itself, as f32.
fn reference(path: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).expect("reference file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let v: Vec<f32> = match t.dtype() {
                safetensors::Dtype::F32 => {
                    t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
                }
                safetensors::Dtype::F16 => {
                    t.data().chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
                }
                other => panic!("{other:?}"),
            };
            (name, t.shape().to_vec(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn gguf_tensors_dequantize_as_llama_cpp_does() {
    let w = WeightFile::open(Path::new(&format!("{DIR}/small.gguf"))).expect("opens");
    assert_eq!(w.format(), Format::Gguf);
    let expected = reference(&format!("{DIR}/small.expected.safetensors"));
    assert_eq!(expected.len(), 7);
    for (name, shape, values) in &expected {
        let info = w.get(name).unwrap_or_else(|| panic!("no `{name}`"));
        assert_eq!(info.shape, shape.iter().map(|&d| d as u64).collect::<Vec<_>>(), "{name}: outermost first");
        let got = w.read(name).expect("reads");
        // Bit for bit: one multiply (and one add for Q4_1) per value, as ggml.
        assert_eq!(got.len(), values.len(), "{name}");
        for (i, (a, b)) in got.iter().zip(values).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{name}[{i}]: {a} against gguf's {b}");
        }
    }
    let types: Vec<(&str, &str)> = w.tensors().iter().map(|t| (t.name.as_str(), t.dtype.as_str())).collect();
    assert_eq!(
        types,
        [
            ("f32", "F32"),
            ("f16", "F16"),
            ("bf16", "BF16"),
            ("q8_0", "Q8_0"),
            ("q4_0", "Q4_0"),
            ("q4_1", "Q4_1"),
            ("blk.0.attn_q.weight", "Q4_1"),
            ("q5_0", "Q5_0")
        ]
    );
    // The metadata, of every value type.
    let m = &w.metadata;
    assert_eq!(m["general.architecture"].as_str(), Some("llama"));
    assert_eq!(m["llama.block_count"].as_u64(), Some(1));
    assert_eq!(m["test.i32"], Value::I64(-7));
    assert_eq!(m["test.f32"].as_f64(), Some(0.5));
    assert_eq!(m["test.f64"].as_f64(), Some(0.25));
    assert_eq!(m["test.bool"], Value::Bool(true));
    assert_eq!(m["test.u64"].as_u64(), Some(1 << 40));
    let strings: Vec<&str> = m["test.strings"].as_array().expect("array").iter().filter_map(Value::as_str).collect();
    assert_eq!(strings, ["a", "bc", ""]);
    assert_eq!(m["test.ints"].as_array().map(|a| a.len()), Some(3));
}

#[test]
fn a_sharded_safetensors_checkpoint_reads_as_one() {
    let dir = format!("{DIR}/sharded");
    // The folder, or its index, names the same checkpoint.
    for path in [dir.clone(), format!("{dir}/model.safetensors.index.json")] {
        let w = WeightFile::open(Path::new(&path)).expect("opens");
        assert_eq!(w.format(), Format::Safetensors);
        let mut names: Vec<&str> = w.tensors().iter().map(|t| t.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["a.weight", "b.weight", "c.weight"]);
        for file in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
            for (name, shape, values) in reference(&format!("{dir}/{file}")) {
                let info = w.get(&name).expect("listed");
                assert_eq!(info.shape, shape.iter().map(|&d| d as u64).collect::<Vec<_>>());
                assert_eq!(w.read(&name).expect("reads"), values, "{name}");
            }
        }
        assert_eq!(w.get("b.weight").map(|t| t.dtype.as_str()), Some("F16"));
    }
}

fn error_of(path: &Path) -> String {
    WeightFile::open(path).map(|_| ()).expect_err("fails").to_string()
}

#[test]
fn damaged_and_unsupported_files_are_named_errors() {
    let tmp = std::env::temp_dir().join(format!("tessera-weights-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp");
    let gguf = std::fs::read(format!("{DIR}/small.gguf")).expect("fixture");
    // Cut short inside the data: the tensor that does not fit is named.
    let cut = tmp.join("cut.gguf");
    std::fs::write(&cut, &gguf[..gguf.len() - 30]).expect("write");
    let e = error_of(&cut);
    assert!(e.contains("cut.gguf: tensor `q5_0` (Q5_0, [1, 32]) needs bytes") && e.contains("it is cut short"), "{e}");
    // Cut inside the header.
    let head = tmp.join("head.gguf");
    std::fs::write(&head, &gguf[..40]).expect("write");
    let e = error_of(&head);
    assert!(e.contains("head.gguf: the file ends inside the header, reading"), "{e}");
    // Not GGUF at all.
    let junk = tmp.join("junk.gguf");
    std::fs::write(&junk, b"PK\x03\x04 not a model").expect("write");
    assert!(error_of(&junk).contains("junk.gguf: not a GGUF file"), "{}", error_of(&junk));
    // A type outside the six is listed, and reading it says what to do.
    let w = WeightFile::open(Path::new(&format!("{DIR}/small.gguf"))).expect("opens");
    let e = w.read("q5_0").expect_err("Q5_0 is not loaded").to_string();
    assert!(
        e.contains("tensor `q5_0`: its type Q5_0 is not one Tessera dequantizes") && e.contains("llama-quantize"),
        "{e}"
    );
    let e = w.read("missing").expect_err("no such tensor").to_string();
    assert!(e.ends_with("small.gguf: has no tensor `missing`"), "{e}");
    // An index that names a file without the tensor.
    let bad = tmp.join("sharded");
    std::fs::create_dir_all(&bad).expect("dir");
    for f in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
        std::fs::copy(format!("{DIR}/sharded/{f}"), bad.join(f)).expect("copy");
    }
    std::fs::write(
        bad.join("model.safetensors.index.json"),
        r#"{"weight_map": {"a.weight": "model-00002-of-00002.safetensors", "b.weight": "model-00001-of-00002.safetensors", "c.weight": "model-00002-of-00002.safetensors"}}"#,
    )
    .expect("write");
    let e = error_of(&bad);
    assert!(
        e.contains("model.safetensors.index.json: maps `a.weight` to model-00002-of-00002.safetensors but it is in"),
        "{e}"
    );
    // A folder with nothing to load, and a path that is not there.
    let empty = tmp.join("empty");
    std::fs::create_dir_all(&empty).expect("dir");
    assert!(error_of(&empty).contains("holds no `.safetensors`"), "{}", error_of(&empty));
    assert!(error_of(&tmp.join("nowhere.gguf")).ends_with("nowhere.gguf: does not exist"));
    let _ = std::fs::remove_dir_all(&tmp);
}
