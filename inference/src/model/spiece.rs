//! T5's tokenizer from a SentencePiece `spiece.model` alone (no `tokenizer.json`).
//!
//! The file is a `ModelProto` protobuf; only the fields a unigram tokenizer needs are read
//! (pieces with score and type, the unknown id, the normalizer's precompiled character map
//! and its dummy-prefix flag). The tokenizer is then built as HF transformers'
//! `T5Converter` (an `SpmConverter`) builds `T5TokenizerFast` from the same file: unigram
//! model, precompiled normalizer followed by right-strip and space-run folding, metaspace
//! pre-tokenizer, `$A </s>` post-processing, and 100 `<extra_id_N>` tokens appended.

use std::path::Path;

use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Precompiled, Replace, Sequence, Strip};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::Error;

/// `<extra_id_0>` .. `<extra_id_99>`, which T5 appends to its SentencePiece vocabulary.
pub const T5_EXTRA_IDS: usize = 100;

/// `SentencePiece.Type` values.
pub const PIECE_NORMAL: u64 = 1;
pub const PIECE_UNKNOWN: u64 = 2;
pub const PIECE_CONTROL: u64 = 3;

#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: u64,
}

/// The parts of a `ModelProto` a unigram tokenizer uses.
#[derive(Debug, Clone, PartialEq)]
pub struct SentencePieceModel {
    pub pieces: Vec<Piece>,
    pub unk_id: usize,
    pub precompiled_charsmap: Vec<u8>,
    pub add_dummy_prefix: bool,
}

fn malformed(path: &Path, what: &str) -> Error {
    Error::Tokenizer(format!(
        "{}: malformed SentencePiece model: {what}",
        path.display()
    ))
}

/// One protobuf field: its number and either a varint/fixed value or a byte slice.
enum Value<'a> {
    Int(u64),
    Bytes(&'a [u8]),
}

/// Iterates the fields of one protobuf message.
struct Fields<'a> {
    data: &'a [u8],
}

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.data.split_first()?;
            self.data = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        (self.data.len() >= len).then(|| {
            let (head, rest) = self.data.split_at(len);
            self.data = rest;
            head
        })
    }

    /// The next `(field number, value)`, `Some(Err)` on truncated or unknown wire types.
    fn next_field(&mut self) -> Option<Result<(u64, Value<'a>), ()>> {
        if self.data.is_empty() {
            return None;
        }
        let field = (|| {
            let key = self.varint()?;
            let value = match key & 7 {
                0 => Value::Int(self.varint()?),
                1 => Value::Int(u64::from_le_bytes(self.take(8)?.try_into().ok()?)),
                2 => {
                    let len = usize::try_from(self.varint()?).ok()?;
                    Value::Bytes(self.take(len)?)
                }
                5 => Value::Int(u64::from(u32::from_le_bytes(
                    self.take(4)?.try_into().ok()?,
                ))),
                _ => return None,
            };
            Some((key >> 3, value))
        })();
        Some(field.ok_or(()))
    }
}

fn fields(data: &[u8]) -> Fields<'_> {
    Fields { data }
}

impl SentencePieceModel {
    pub fn read(path: &Path) -> Result<Self, Error> {
        let data = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&data).map_err(|what| malformed(path, what))
    }

    pub fn parse(data: &[u8]) -> Result<Self, &'static str> {
        let mut model = Self {
            pieces: Vec::new(),
            unk_id: 0,
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
        };
        let mut top = fields(data);
        while let Some(field) = top.next_field() {
            match field.map_err(|()| "truncated message")? {
                (1, Value::Bytes(bytes)) => model.pieces.push(parse_piece(bytes)?),
                (2, Value::Bytes(trainer)) => {
                    let mut trainer = fields(trainer);
                    while let Some(field) = trainer.next_field() {
                        if let (40, Value::Int(id)) =
                            field.map_err(|()| "truncated trainer spec")?
                        {
                            model.unk_id = usize::try_from(id).map_err(|_| "unk_id")?;
                        }
                    }
                }
                (3, Value::Bytes(normalizer)) => {
                    let mut normalizer = fields(normalizer);
                    while let Some(field) = normalizer.next_field() {
                        match field.map_err(|()| "truncated normalizer spec")? {
                            (2, Value::Bytes(map)) => model.precompiled_charsmap = map.to_vec(),
                            (3, Value::Int(flag)) => model.add_dummy_prefix = flag != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if model.pieces.is_empty() {
            return Err("no pieces");
        }
        if model.unk_id >= model.pieces.len() {
            return Err("unk_id beyond the pieces");
        }
        Ok(model)
    }

    /// Encodes the same fields back (for writing test checkpoints).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in &self.pieces {
            let mut body = Vec::new();
            put_bytes(&mut body, 1, piece.piece.as_bytes());
            put_key(&mut body, 2, 5);
            body.extend(piece.score.to_le_bytes());
            put_key(&mut body, 3, 0);
            put_varint(&mut body, piece.kind);
            put_bytes(&mut out, 1, &body);
        }
        let mut trainer = Vec::new();
        put_key(&mut trainer, 3, 0);
        put_varint(&mut trainer, 1); // model_type UNIGRAM
        put_key(&mut trainer, 40, 0);
        put_varint(&mut trainer, self.unk_id as u64);
        put_bytes(&mut out, 2, &trainer);
        let mut normalizer = Vec::new();
        put_bytes(&mut normalizer, 2, &self.precompiled_charsmap);
        put_key(&mut normalizer, 3, 0);
        put_varint(&mut normalizer, u64::from(self.add_dummy_prefix));
        put_bytes(&mut out, 3, &normalizer);
        out
    }

    /// T5's fast tokenizer, as `T5Converter` builds it from this model.
    pub fn t5_tokenizer(&self) -> Result<Tokenizer, Error> {
        let error = |e: &dyn std::fmt::Display| {
            Error::Tokenizer(format!("building the T5 tokenizer from SentencePiece: {e}"))
        };
        let mut vocab: Vec<(String, f64)> = self
            .pieces
            .iter()
            .map(|p| (p.piece.clone(), f64::from(p.score)))
            .collect();
        let extra: Vec<String> = (0..T5_EXTRA_IDS)
            .rev()
            .map(|i| format!("<extra_id_{i}>"))
            .collect();
        vocab.extend(extra.iter().map(|e| (e.clone(), 0.0)));
        let eos = self
            .pieces
            .iter()
            .position(|p| p.piece == "</s>")
            .ok_or_else(|| Error::Tokenizer("SentencePiece model has no </s>".into()))?;
        let mut tokenizer =
            Tokenizer::new(Unigram::from(vocab, Some(self.unk_id), false).map_err(|e| error(&e))?);
        let specials = self
            .pieces
            .iter()
            .filter(|p| p.kind != PIECE_NORMAL)
            .map(|p| p.piece.as_str())
            .chain(extra.iter().map(String::as_str));
        tokenizer
            .add_special_tokens(specials.map(|s| AddedToken::from(s, true)))
            .map_err(|e| error(&e))?;
        let mut normalizers = Vec::new();
        if !self.precompiled_charsmap.is_empty() {
            let precompiled = Precompiled::from(&self.precompiled_charsmap)
                .map_err(|e| Error::Tokenizer(format!("SentencePiece charsmap: {e}")))?;
            normalizers.push(precompiled.into());
        }
        normalizers.push(Strip::new(false, true).into());
        normalizers.push(
            Replace::new(ReplacePattern::Regex(" {2,}".into()), "▁")
                .map_err(|e| error(&e))?
                .into(),
        );
        let prepend = match self.add_dummy_prefix {
            true => PrependScheme::Always,
            false => PrependScheme::Never,
        };
        tokenizer
            .with_normalizer(Some(Sequence::new(normalizers)))
            .map_err(|e| error(&e))?
            .with_pre_tokenizer(Some(Metaspace::new('▁', prepend, true)))
            .with_decoder(Some(Metaspace::new('▁', prepend, true)))
            .with_post_processor(Some(
                TemplateProcessing::builder()
                    .try_single("$A </s>")
                    .map_err(|e| error(&e))?
                    .try_pair("$A </s> $B </s>")
                    .map_err(|e| error(&e))?
                    .special_tokens(vec![("</s>", eos as u32)])
                    .build()
                    .map_err(|e| error(&e))?,
            ));
        Ok(tokenizer)
    }
}

fn parse_piece(data: &[u8]) -> Result<Piece, &'static str> {
    let mut piece = Piece {
        piece: String::new(),
        score: 0.0,
        kind: PIECE_NORMAL,
    };
    let mut body = fields(data);
    while let Some(field) = body.next_field() {
        match field.map_err(|()| "truncated piece")? {
            (1, Value::Bytes(text)) => {
                piece.piece = String::from_utf8(text.to_vec()).map_err(|_| "non-UTF-8 piece")?
            }
            (2, Value::Int(bits)) => piece.score = f32::from_bits(bits as u32),
            (3, Value::Int(kind)) => piece.kind = kind,
            _ => {}
        }
    }
    Ok(piece)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_key(out: &mut Vec<u8>, field: u64, wire_type: u64) {
    put_varint(out, (field << 3) | wire_type);
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> SentencePieceModel {
        let piece = |piece: &str, score: f32, kind: u64| Piece {
            piece: piece.into(),
            score,
            kind,
        };
        SentencePieceModel {
            pieces: vec![
                piece("<pad>", 0.0, PIECE_CONTROL),
                piece("</s>", 0.0, PIECE_CONTROL),
                piece("<unk>", 0.0, PIECE_UNKNOWN),
                piece("▁a", -2.0, PIECE_NORMAL),
                piece("▁cat", -3.0, PIECE_NORMAL),
                piece("▁", -5.0, PIECE_NORMAL),
                piece("c", -8.0, PIECE_NORMAL),
                piece("a", -8.0, PIECE_NORMAL),
                piece("t", -8.0, PIECE_NORMAL),
            ],
            unk_id: 2,
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
        }
    }

    #[test]
    fn encoding_parses_back() {
        let model = model();
        assert_eq!(SentencePieceModel::parse(&model.encode()), Ok(model));
    }

    #[test]
    fn truncated_or_empty_models_are_refused() {
        let bytes = model().encode();
        assert!(SentencePieceModel::parse(&bytes[..bytes.len() - 3]).is_err());
        assert_eq!(SentencePieceModel::parse(&[]), Err("no pieces"));
    }

    #[test]
    fn t5_tokenizer_segments_with_the_pieces_and_appends_eos() {
        let tokenizer = model().t5_tokenizer().unwrap();
        let ids = tokenizer
            .encode("a  cat tac ", true)
            .unwrap()
            .get_ids()
            .to_vec();
        // "▁a", "▁cat", "▁" + "t" "a" "c", then </s>.
        assert_eq!(ids, vec![3, 4, 5, 8, 7, 6, 1]);
        assert_eq!(tokenizer.get_vocab_size(true), 9 + T5_EXTRA_IDS);
        assert_eq!(tokenizer.token_to_id("<extra_id_0>"), Some(9 + 99));
    }
}
