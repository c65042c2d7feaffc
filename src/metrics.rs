//! GLUE metrics: accuracy, F1, Matthews correlation, Pearson and Spearman correlation.

use crate::task::{MetricKind, TaskSpec, ACC_AND_F1};
use std::collections::BTreeMap;

/// Fraction of equal predictions.
pub fn accuracy(pred: &[usize], gold: &[usize]) -> f64 {
    if pred.is_empty() {
        return 0.0;
    }
    pred.iter().zip(gold).filter(|(p, g)| p == g).count() as f64 / pred.len() as f64
}

/// F1 of class 1.
pub fn f1(pred: &[usize], gold: &[usize]) -> f64 {
    let tp = pred
        .iter()
        .zip(gold)
        .filter(|(&p, &g)| p == 1 && g == 1)
        .count() as f64;
    let fp = pred
        .iter()
        .zip(gold)
        .filter(|(&p, &g)| p == 1 && g != 1)
        .count() as f64;
    let fnn = pred
        .iter()
        .zip(gold)
        .filter(|(&p, &g)| p != 1 && g == 1)
        .count() as f64;
    if tp == 0.0 {
        return 0.0;
    }
    2.0 * tp / (2.0 * tp + fp + fnn)
}

/// Matthews correlation coefficient of binary predictions.
pub fn matthews(pred: &[usize], gold: &[usize]) -> f64 {
    let (mut tp, mut tn, mut fp, mut fnn) = (0f64, 0f64, 0f64, 0f64);
    for (&p, &g) in pred.iter().zip(gold) {
        match (p == 1, g == 1) {
            (true, true) => tp += 1.0,
            (false, false) => tn += 1.0,
            (true, false) => fp += 1.0,
            (false, true) => fnn += 1.0,
        }
    }
    let den = ((tp + fp) * (tp + fnn) * (tn + fp) * (tn + fnn)).sqrt();
    if den == 0.0 {
        0.0
    } else {
        (tp * tn - fp * fnn) / den
    }
}

/// Pearson correlation.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = x.iter().sum::<f64>() / n;
    let my = y.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    if sxx == 0.0 || syy == 0.0 {
        0.0
    } else {
        sxy / (sxx * syy).sqrt()
    }
}

fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            r[idx[k]] = avg;
        }
        i = j + 1;
    }
    r
}

/// Spearman rank correlation (average ranks for ties).
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

/// Index of the largest value.
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// Whether `score` beats the best so far: a NaN score never does, and a tie keeps the
/// earlier one. Used for every "best on dev" choice (checkpoints, grid points).
pub fn improves(score: f64, best: Option<f64>) -> bool {
    !score.is_nan() && best.is_none_or(|b| score > b)
}

/// Index of the largest score, skipping NaN (a diverged run); the first of equal scores.
/// `None` when every score is NaN (or there is none).
pub fn best_index(scores: &[f64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &s) in scores.iter().enumerate() {
        if improves(s, best.map(|b| scores[b])) {
            best = Some(i);
        }
    }
    best
}

/// The task's primary metric in a score map. Maps written before `acc_and_f1` was recorded
/// give it from their accuracy and F1.
pub fn primary(task: &TaskSpec, m: &BTreeMap<String, f64>) -> f64 {
    let name = task.primary_metric();
    match (m.get(name), m.get("accuracy"), m.get("f1")) {
        (Some(&v), _, _) => v,
        (None, Some(a), Some(f)) if name == ACC_AND_F1 => (a + f) / 2.0,
        _ => f64::NAN,
    }
}

/// Scores logits against gold labels with the task's GLUE metric(s).
pub fn score(task: &TaskSpec, logits: &[Vec<f32>], gold: &[f32]) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    if task.is_regression() {
        let p: Vec<f64> = logits.iter().map(|l| l[0] as f64).collect();
        let g: Vec<f64> = gold.iter().map(|&x| x as f64).collect();
        m.insert("pearson".into(), pearson(&p, &g));
        m.insert("spearman".into(), spearman(&p, &g));
        return m;
    }
    let p: Vec<usize> = logits.iter().map(|l| argmax(l)).collect();
    let g: Vec<usize> = gold.iter().map(|&x| x as usize).collect();
    let acc = accuracy(&p, &g);
    m.insert("accuracy".into(), acc);
    match task.metric {
        MetricKind::F1Accuracy => {
            let f = f1(&p, &g);
            m.insert("f1".into(), f);
            m.insert(ACC_AND_F1.into(), (acc + f) / 2.0);
        }
        MetricKind::Matthews => {
            m.insert("matthews".into(), matthews(&p, &g));
        }
        _ => {}
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    // TP 2, FP 1, FN 1, TN 2.
    const PRED: [usize; 6] = [1, 1, 0, 0, 1, 0];
    const GOLD: [usize; 6] = [1, 0, 0, 1, 1, 0];

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} vs {b}");
    }

    #[test]
    fn best_scores_skip_nan() {
        let nan = f64::NAN;
        assert_eq!(best_index(&[0.5, nan, 0.7, 0.7]), Some(2));
        assert_eq!(best_index(&[nan, 0.1]), Some(1), "a NaN first is not kept");
        assert_eq!(best_index(&[nan, -0.3, nan]), Some(1));
        assert_eq!(best_index(&[nan, nan]), None);
        assert_eq!(best_index(&[]), None);
        assert!(!improves(nan, None));
        assert!(!improves(nan, Some(0.1)));
        assert!(improves(0.2, Some(0.1)));
        assert!(!improves(0.1, Some(0.1)), "ties keep the earlier");
    }

    #[test]
    fn classification_metrics_by_hand() {
        close(accuracy(&PRED, &GOLD), 4.0 / 6.0);
        // 2·TP / (2·TP + FP + FN) = 4 / 6.
        close(f1(&PRED, &GOLD), 4.0 / 6.0);
        // (TP·TN - FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 3 / 9.
        close(matthews(&PRED, &GOLD), 1.0 / 3.0);
        close(matthews(&GOLD, &GOLD), 1.0);
        assert_eq!(f1(&[0, 0], &[1, 0]), 0.0);
        assert_eq!(matthews(&[1, 1], &[1, 1]), 0.0);
        assert_eq!(accuracy(&[], &[]), 0.0);
    }

    #[test]
    fn correlations_by_hand() {
        // Deviations (-1.5, -0.5, 0.5, 1.5) and (-3, -1, 0, 4): 11 / sqrt(5 · 26).
        close(
            pearson(&[1.0, 2.0, 3.0, 4.0], &[2.0, 4.0, 5.0, 9.0]),
            11.0 / 130f64.sqrt(),
        );
        close(pearson(&[1.0, 2.0], &[3.0, 3.0]), 0.0);
        // Ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): 4.5 / sqrt(4.5 · 5).
        close(
            spearman(&[1.0, 2.0, 2.0, 3.0], &[10.0, 20.0, 30.0, 40.0]),
            0.9f64.sqrt(),
        );
        close(spearman(&[3.0, 1.0, 2.0], &[30.0, 10.0, 20.0]), 1.0);
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[-2.0, -1.0]), 1);
    }

    #[test]
    fn score_reports_each_task_metric() {
        let logits: Vec<Vec<f32>> = PRED
            .iter()
            .map(|&p| {
                if p == 1 {
                    vec![0.0, 1.0]
                } else {
                    vec![1.0, 0.0]
                }
            })
            .collect();
        let gold: Vec<f32> = GOLD.iter().map(|&g| g as f32).collect();
        let task = |n| crate::task::glue(n).unwrap();
        let keys = |m: &BTreeMap<String, f64>| m.keys().cloned().collect::<Vec<_>>();
        let sst2 = score(task("sst2"), &logits, &gold);
        assert_eq!(keys(&sst2), ["accuracy"]);
        let mrpc = score(task("mrpc"), &logits, &gold);
        assert_eq!(keys(&mrpc), ["acc_and_f1", "accuracy", "f1"]);
        close(mrpc["f1"], 4.0 / 6.0);
        close(primary(task("mrpc"), &mrpc), 4.0 / 6.0);
        // A map from before `acc_and_f1` was recorded.
        let old = BTreeMap::from([("accuracy".to_string(), 0.5), ("f1".to_string(), 0.7)]);
        close(primary(task("mrpc"), &old), 0.6);
        close(primary(task("sst2"), &old), 0.5);
        assert!(primary(task("cola"), &old).is_nan());
        let cola = score(task("cola"), &logits, &gold);
        close(cola["matthews"], 1.0 / 3.0);
        let reg: Vec<Vec<f32>> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|&x| vec![x]).collect();
        let stsb = score(task("stsb"), &reg, &[2.0, 4.0, 5.0, 9.0]);
        close(stsb["pearson"], 11.0 / 130f64.sqrt());
        close(stsb["spearman"], 1.0);
    }
}
