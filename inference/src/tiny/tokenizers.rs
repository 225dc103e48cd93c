//! Tokenizer files of synthetic models: a unigram T5 `spiece.model` and `tokenizer.json` (as
//! FLUX.1-dev's `tokenizer_2/`) and a small byte-level BPE `vocab.json` + `merges.txt` for CLIP (as its
//! `tokenizer/`, which has no `tokenizer.json`).

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::Error;
use crate::model::spiece::{PIECE_CONTROL, PIECE_NORMAL, PIECE_UNKNOWN, Piece, SentencePieceModel};
use crate::model::text::{CLIP_BOS, CLIP_EOS};

/// Words that get whole-word pieces in both vocabularies; anything else falls back to
/// characters (T5) or byte-level symbols (CLIP).
const WORDS: &[&str] = &[
    "a", "the", "of", "in", "on", "with", "and", "photo", "portrait", "cat", "dog", "woman", "man",
    "city", "night", "forest", "red", "blue", "green", "light",
];

fn tokenizer_error(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("writing a tiny tokenizer: {e}"))
}

fn write(path: &Path, text: String) -> Result<(), Error> {
    write_bytes(path, text.into_bytes())
}

fn write_bytes(path: &Path, bytes: Vec<u8>) -> Result<(), Error> {
    std::fs::write(path, bytes).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes the T5 tokenizer twice, as published T5 directories hold it: `spiece.model` and
/// the `tokenizer.json` built from it. `pieces` pads the vocabulary with unreachable filler
/// pieces (FLUX.1-dev's has 32 000). Returns the vocabulary size including T5's 100 extra
/// ids. Ids 0, 1, 2 are `<pad>`, `</s>`, `<unk>` as in T5.
pub fn write_t5_tokenizer(spiece: &Path, json: &Path, pieces: usize) -> Result<usize, Error> {
    let piece = |piece: String, score: f32, kind: u64| Piece { piece, score, kind };
    let mut vocab = vec![
        piece("<pad>".into(), 0.0, PIECE_CONTROL),
        piece("</s>".into(), 0.0, PIECE_CONTROL),
        piece("<unk>".into(), 0.0, PIECE_UNKNOWN),
    ];
    vocab.extend(
        WORDS
            .iter()
            .map(|w| piece(format!("▁{w}"), -4.0, PIECE_NORMAL)),
    );
    vocab.push(piece("▁".into(), -6.0, PIECE_NORMAL));
    let characters = ('a'..='z')
        .chain('A'..='Z')
        .chain('0'..='9')
        .chain(".,!?'-".chars());
    vocab.extend(characters.map(|c| piece(c.to_string(), -8.0, PIECE_NORMAL)));
    let fillers = pieces.saturating_sub(vocab.len());
    vocab.extend((0..fillers).map(|i| piece(format!("▁zz{i}zz"), -30.0, PIECE_NORMAL)));
    let model = SentencePieceModel {
        pieces: vocab,
        unk_id: 2,
        precompiled_charsmap: Vec::new(),
        add_dummy_prefix: true,
    };
    write_bytes(spiece, model.encode())?;
    let tokenizer = model.t5_tokenizer()?;
    write(
        json,
        tokenizer.to_string(true).map_err(tokenizer_error)? + "\n",
    )?;
    Ok(tokenizer.get_vocab_size(true))
}

/// GPT-2's reversible byte-to-character map used by byte-level BPE: printable bytes map to
/// themselves, the rest to code points from 256 up.
fn byte_symbols() -> Vec<char> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| match printable(b) {
            true => char::from(b),
            false => {
                next += 1;
                char::from_u32(next - 1).unwrap_or('?')
            }
        })
        .collect()
}

/// Writes CLIP's `vocab.json` and `merges.txt`; returns the vocabulary size. Like CLIP's,
/// the vocabulary is every byte symbol alone and with `</w>`, then one entry per merge,
/// (then unreachable fillers up to `size`, CLIP-L has 49 408 entries), then
/// `<|startoftext|>` and `<|endoftext|>` with the two highest ids (CLIP pools at the
/// highest id).
pub fn write_clip_bpe(vocab_path: &Path, merges_path: &Path, size: usize) -> Result<usize, Error> {
    let symbols: Vec<String> = byte_symbols().into_iter().map(String::from).collect();
    let mut tokens: Vec<String> = symbols.clone();
    tokens.extend(symbols.iter().map(|s| format!("{s}</w>")));
    // Each word merges left to right into one token.
    let mut merges: Vec<(String, String)> = Vec::new();
    for word in WORDS {
        let mut chars: Vec<String> = word.chars().map(String::from).collect();
        if let Some(last) = chars.last_mut() {
            last.push_str("</w>");
        }
        let mut merged = chars[0].clone();
        for next in &chars[1..] {
            let pair = (merged.clone(), next.clone());
            merged.push_str(next);
            if !merges.contains(&pair) {
                merges.push(pair);
                tokens.push(merged.clone());
            }
        }
    }
    let fillers = size.saturating_sub(tokens.len() + 2);
    tokens.extend((0..fillers).map(|i| format!("<|filler{i}|>")));
    tokens.extend([CLIP_BOS.to_string(), CLIP_EOS.to_string()]);
    let mut vocab = BTreeMap::new();
    for (id, token) in tokens.iter().enumerate() {
        vocab.entry(token.clone()).or_insert(id);
    }
    if vocab.len() != tokens.len() {
        return Err(tokenizer_error("duplicate CLIP vocabulary entries"));
    }
    let vocab_json = serde_json::to_string(&vocab).map_err(tokenizer_error)?;
    write(vocab_path, vocab_json + "\n")?;
    let merges_text: String = merges.iter().map(|(a, b)| format!("{a} {b}\n")).collect();
    write(merges_path, format!("#version: 0.2\n{merges_text}"))?;
    Ok(tokens.len())
}
