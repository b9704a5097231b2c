//! The closing explanation tag with a real byte-level BPE: a tokenizer trained here with
//! Qwen2's pre-tokenizer (its split regex glues punctuation to a following `<|`) and the chat
//! special tokens, so `.<|end_of_explanation|>` is spelled with a token that holds the `.` and
//! the tag's start, and the tag's standalone ids never occur.
use rlt_trainer::data::{student_segments, Example, Prompts};
use rlt_trainer::rl::completion::{find_subsequence, parse_completion};
use rlt_trainer::rl::rollout::GroupPrompt;
use rlt_trainer::tokenizer::{Tokenizer, END_OF_EXPLANATION, END_OF_THOUGHT};
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
    // Text in the old, unpadded layout, where the explanation's last character meets the tag.
    let corpus: Vec<String> = (0..40)
        .flat_map(|i| {
            ENDINGS.map(|end| {
                format!(
                    "<|im_start|>assistant\n<|begin_of_explanation|>step {i}: {end}<|end_of_explanation|><|im_end|>\n"
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
            let p = parse_completion(&ids, &tok, &end_tag, &stop).unwrap();
            assert!(p.well_formed, "{generated:?} is well closed");
            assert_eq!(tok.decode(&p.explanation).unwrap(), explanation);
            assert_eq!(p.explanation[..p.shared], ids[..p.shared]);

            // The student's chat around it holds the explanation and no piece of the tag.
            let e = Example {
                question: "Q?".into(),
                solution: "12".into(),
                reasoning: None,
                system: None,
            };
            let gp = GroupPrompt::new(&tok, &Prompts::short(), &e).unwrap();
            let row: Vec<i64> = [
                &gp.student_prefix[..],
                &p.explanation,
                &gp.student_middle,
                &gp.solution,
                &gp.student_suffix,
            ]
            .concat();
            let chat = tok.decode(&row).unwrap();
            assert_eq!(
                chat,
                student_segments(&Prompts::short(), &e, &explanation).concat()
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
