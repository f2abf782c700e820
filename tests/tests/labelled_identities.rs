//! Every identity of `../shared/faces/labelled` (the groups of same-person pairs in `master.csv`):
//! enroll one photo each, then identify every other photo of every identity with the hub's hot set
//! and identification rule. Each must be the right customer (or, at worst, be asked the second
//! factor) — never another customer.

use std::{collections::BTreeMap, path::Path};

use face::{FaceConfig, FaceEngine, Gates};
use hub::{
    config::IdentifyConfig,
    hotset::HotIndex,
    verify::{conclude, Conclusion},
};
use protocol::{HotEntry, SecondFactorKind};

fn identities(dir: &Path) -> Vec<Vec<String>> {
    let csv = std::fs::read_to_string(dir.join("master.csv")).expect("master.csv");
    let mut parent: BTreeMap<String, String> = BTreeMap::new();
    fn find(parent: &mut BTreeMap<String, String>, x: &str) -> String {
        let p = parent
            .entry(x.to_owned())
            .or_insert_with(|| x.to_owned())
            .clone();
        if p == x {
            return p;
        }
        let root = find(parent, &p);
        parent.insert(x.to_owned(), root.clone());
        root
    }
    for line in csv.lines().skip(1) {
        let fields: Vec<&str> = line.trim().split(',').collect();
        if fields.len() == 3 && fields[2] == "Yes" {
            let (a, b) = (find(&mut parent, fields[0]), find(&mut parent, fields[1]));
            parent.insert(a, b);
        }
    }
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in parent.keys().cloned().collect::<Vec<_>>() {
        let root = find(&mut parent, &file);
        groups.entry(root).or_default().push(file);
    }
    groups.into_values().filter(|g| g.len() > 1).collect()
}

#[test]
fn every_labelled_identity_pays_as_itself() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/faces/labelled");
    assert!(
        dir.join("master.csv").exists(),
        "../shared/faces/labelled must be beside the repository"
    );
    let engine = FaceEngine::load_default(FaceConfig::default()).unwrap();
    // Photos the gates refuse (prints of prints, no face) are not usable at a terminal either:
    // each is named with its reason, and they may not be more than a quarter of the photos.
    let mut refused: Vec<String> = Vec::new();
    let mut embed = |file: &str| {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let analysis = engine.analyze(&bytes, Gates::All).unwrap();
        match (&analysis.refusal, analysis.embedding) {
            (None, Some(embedding)) => Some(embedding),
            (refusal, _) => {
                refused.push(format!("{file}: {refusal:?}"));
                None
            }
        }
    };
    let groups = identities(&dir);
    let photos: usize = groups.iter().map(Vec::len).sum();
    let mut enrolled = Vec::new();
    let mut probes = Vec::new();
    let mut dropped = Vec::new();
    for (i, group) in groups.iter().enumerate() {
        let usable: Vec<(String, Vec<f32>)> = group
            .iter()
            .filter_map(|f| embed(f).map(|e| (f.clone(), e)))
            .collect();
        if usable.len() < 2 {
            // Fewer than two usable photos: nothing to enroll and probe with.
            dropped.push(group.join("+"));
            continue;
        }
        let account = protocol::AccountId::from(format!("id-{i}"));
        enrolled.push(HotEntry {
            account_id: account.clone(),
            home_store_id: "store-1".into(),
            templates: vec![(i as u64, usable[0].1.clone())],
            second_factor: SecondFactorKind::Pin,
            second_factor_hash: String::new(),
            version: 0,
        });
        for (file, embedding) in &usable[1..] {
            probes.push((account.clone(), file.clone(), embedding.clone()));
        }
    }
    eprintln!(
        "{} of {photos} photos refused: {refused:#?}\n{} of {} identities dropped: {dropped:?}",
        refused.len(),
        dropped.len(),
        groups.len()
    );
    assert!(
        refused.len() * 4 <= photos,
        "more than a quarter of the photos refused: {refused:#?}"
    );
    assert!(
        dropped.len() * 4 <= groups.len(),
        "more than a quarter of the identities dropped: {dropped:?}"
    );
    assert!(enrolled.len() >= 6, "{} identities usable", enrolled.len());
    let index = HotIndex::build(&enrolled);
    let rule = IdentifyConfig::default();
    let (mut accepted, mut asked) = (0, 0);
    for (account, file, embedding) in &probes {
        match conclude(&index.top2(embedding), &rule) {
            Conclusion::Accept(who) => {
                assert_eq!(&who, account, "{file} paid as {who}");
                accepted += 1;
            }
            Conclusion::Ask(candidates) => {
                assert!(
                    candidates.contains(account),
                    "{file}: asked for {candidates:?}"
                );
                asked += 1;
            }
            Conclusion::Unknown => panic!("{file} ({account}) was not recognised"),
        }
    }
    eprintln!(
        "{} identities enrolled, {} other photos: {accepted} accepted as themselves, {asked} asked \
         the second factor",
        enrolled.len(),
        probes.len()
    );
    assert!(
        accepted * 10 >= probes.len() * 8,
        "most pay on the face alone"
    );
}
