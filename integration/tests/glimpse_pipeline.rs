//! The GlimpsePrune kernel pipeline on the synthetic batch: it finds the
//! planted salient tokens, and with every token kept it only drops the
//! glimpse token.

use foveal::KeepRule;
use foveal_candle::glimpse_pipeline::{keep_rule, run_cpu, Batch, Config};

#[test]
fn keeps_every_planted_salient_token_and_prunes_the_rest() {
    let batch = Batch::new(Config::default()).unwrap();
    let out = run_cpu(&batch, &keep_rule()).unwrap();
    for b in 0..batch.batch() {
        let kept: Vec<i32> = out
            .keep
            .kept(b)
            .iter()
            .map(|&i| batch.rows.visual(b)[i as usize])
            .collect();
        for &p in &batch.salient[b] {
            assert!(
                kept.contains(&(p as i32)),
                "row {b}: salient token at {p} was pruned"
            );
        }
        // max_ratio 0.5 caps the kept set.
        assert!(
            kept.len() <= batch.rows.nv(b) / 2,
            "row {b}: kept {} of {}",
            kept.len(),
            batch.rows.nv(b)
        );
        // Compacted rows: all text (less the glimpse) plus the kept visual tokens.
        let text = batch.rows.len(b) - batch.rows.nv(b) - 1;
        assert_eq!(out.positions.row(b).len(), text + kept.len());
    }
}

#[test]
fn keeping_everything_only_drops_the_glimpse_token() {
    let batch = Batch::new(Config::default()).unwrap();
    let out = run_cpu(&batch, &KeepRule::keep_all()).unwrap();
    let (seq, s_new, hkv, d) = (
        batch.rows.seq(),
        out.positions.max_len(),
        batch.cfg.kv_heads,
        batch.cfg.head_dim,
    );
    assert_eq!(s_new, seq - 1);
    for b in 0..batch.batch() {
        let want: Vec<i32> = (batch.rows.start(b) as i32..batch.rows.end(b) as i32 - 1).collect();
        assert_eq!(out.positions.row(b), &want[..]);
        // Left padding: row b's entry at position p lands in slot p (every row ends at seq - 1 after the drop).
        for l in 0..=batch.cfg.layers {
            for h in 0..hkv {
                for &p in &want {
                    let src = &batch.k[l][((b * hkv + h) * seq + p as usize) * d..][..d];
                    let dst = &out.k[l][((b * hkv + h) * s_new + p as usize) * d..][..d];
                    assert_eq!(src, dst, "layer {l} row {b} head {h} position {p}");
                }
            }
        }
        let hid = batch.cfg.hidden;
        let first = batch.rows.start(b);
        assert_eq!(
            &out.hidden[(b * s_new + first) * hid..(b * s_new + seq - 1) * hid],
            &batch.hidden[(b * seq + first) * hid..(b * seq + seq - 1) * hid]
        );
        assert!(
            out.hidden[b * s_new * hid..(b * s_new + first) * hid]
                .iter()
                .all(|&x| x == 0.0),
            "padded slots are zero"
        );
    }
}
