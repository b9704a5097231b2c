//! The explanation with a real byte-level BPE: a tokenizer trained here with Qwen2's
//! pre-tokenizer (its split regex glues punctuation to a following `<|`, and to the newlines
//! after it) and the chat special tokens, so `.<|end_of_explanation|>` is spelled with a token
//! that holds the `.` and the tag's start, and `.\n\n` can be one token.
use rlt_trainer::data::{student_segments, Example, Prompts};
use rlt_trainer::model::tokenizer::{Tokenizer, END_OF_EXPLANATION, END_OF_THOUGHT};
use rlt_trainer::rl::completion::{find_subsequence, parse_completion};
use rlt_trainer::rl::rollout::GroupPrompt;
use tokenizers::models::bpe::BpeTrainerBuilder;
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

/// Qwen2's pre-tokenizer split pattern (tokenizer.json of Qwen2.5).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The explanation endings a tokenizer glues to the tag, and one it does not (digits stand
/// alone in Qwen2's split).
const ENDINGS: [&str; 4] = [
    "so the answer is 12.",
    "we get {x}",
    "it costs 5$",
    "total 2024",
];

fn trained_bpe() -> Tokenizer {
    let spec = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": {}, "merges": []}
    });
    let mut inner: tokenizers::Tokenizer = spec.to_string().parse().unwrap();
    let special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(|t| AddedToken::from(t, true))
        .to_vec();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(700)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(special)
        .build()
        .into();
    // Text in the old, unpadded layout, where the explanation's last character meets the tag,
    // and in the padded one, where it meets the padding.
    let corpus: Vec<String> = (0..40)
        .flat_map(|i| {
            ENDINGS.map(|end| {
                format!(
                    "<|im_start|>assistant\n<|begin_of_explanation|>step {i}: {end}<|end_of_explanation|><|im_end|>\n\
                     <|begin_of_thought|>\n\nstep {i}: {end}\n\n<|end_of_thought|>\n\n"
                )
            })
        })
        .collect();
    inner.train(&mut trainer, corpus.iter()).unwrap();
    let dir = std::env::temp_dir().join(format!("rlt-bpe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    inner.save(dir.join("tokenizer.json"), false).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    tok
}

fn question() -> Example {
    Example {
        question: "Q?".into(),
        solution: "12".into(),
        reasoning: None,
        system: None,
    }
}

#[test]
fn a_closing_tag_glued_to_punctuation_is_found_and_kept_out_of_the_students_thought() {
    let tok = trained_bpe();
    let end_tag = tok.encode(END_OF_EXPLANATION).unwrap();
    let stop = tok.eos_ids().to_vec();
    let mut glued = 0;
    for end in ENDINGS {
        let explanation = format!("First, add.\n\nThen {end}");
        for generated in [
            format!("{explanation}{END_OF_EXPLANATION}<|im_end|>"),
            format!("{explanation}\n\n{END_OF_EXPLANATION}<|im_end|>"),
        ] {
            let ids = tok.encode(&generated).unwrap();
            glued += usize::from(find_subsequence(&ids, &end_tag).is_none());
            let p = parse_completion(&ids, &tok, &stop).unwrap();
            assert!(p.well_formed, "{generated:?} is well closed");
            assert_eq!(p.text, explanation);

            // The student's chat around it holds the explanation and no piece of the tag.
            let gp = GroupPrompt::new(&tok, &Prompts::short(), &question()).unwrap();
            let row = gp.student_row(&tok, &p.text).unwrap();
            let chat = tok.decode(&row.ids).unwrap();
            assert_eq!(
                chat,
                student_segments(&Prompts::short(), &question(), &explanation).concat()
            );
            assert!(!chat.contains("explanation|>"), "{chat}");
            assert_eq!(chat.matches(END_OF_THOUGHT).count(), 1);
        }
    }
    // The tokenizer does glue: the standalone ids are missing for the punctuation endings.
    assert!(
        glued >= 3,
        "only {glued} completions lacked the standalone tag ids"
    );
}

/// The student's chat is the one string tokenized whole, as the student saw its training
/// chats: an explanation ending in `.` meets the padding after it in one token (`.\n\n`),
/// which belongs to the explanation's span, and the teacher, which wrote the same `.\n\n`
/// before its own closing tag, shares that token, so the KL term covers it.
#[test]
fn the_students_chat_is_tokenized_as_one_string() {
    let tok = trained_bpe();
    let gp = GroupPrompt::new(&tok, &Prompts::short(), &question()).unwrap();
    let mut merged = 0;
    for end in ENDINGS {
        let explanation = format!("First, add.\n\nThen {end}");
        let row = gp.student_row(&tok, &explanation).unwrap();
        let whole = student_segments(&Prompts::short(), &question(), &explanation).concat();
        assert_eq!(row.ids, tok.encode(&whole).unwrap(), "{explanation:?}");
        // The spans hold the explanation and the solution.
        let text = |r: std::ops::Range<usize>| tok.decode(&row.ids[r]).unwrap();
        assert!(
            text(row.explanation.clone()).starts_with(&explanation),
            "{end}"
        );
        assert!(text(row.solution.clone()).contains("12"), "{end}");
        let last = tok
            .decode(&row.ids[row.explanation.end - 1..row.explanation.end])
            .unwrap();
        if last.ends_with("\n\n") {
            merged += 1;
            // The teacher's sampled ids up to its closing tag agree through that token.
            let generated = tok
                .encode(&format!("{explanation}\n\n{END_OF_EXPLANATION}<|im_end|>"))
                .unwrap();
            let mine = &row.ids[row.explanation.clone()];
            assert_eq!(&generated[..mine.len()], mine, "{end}");
        }
    }
    assert!(
        merged >= 1,
        "the tokenizer never glued an ending to the padding"
    );
}
