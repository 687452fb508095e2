"""From network probabilities to a lesion mask: the case-level gate, the mean of several networks,
the component rules and the edge from the case's own mixture (config.eval), and masks written on
each scan's original grid."""
import csv
import io
import os
import time

from absl import logging
import numpy as np

from cgc_jax.core import folds as folds_lib
from cgc_jax.core import store as store_lib
from cgc_jax.imaging import geometry
from cgc_jax.imaging import metrics
from cgc_jax.imaging import morphology
from cgc_jax.imaging import nifti
from cgc_jax.labels import gmm
from cgc_jax.runtime import distributed


def case_mixture(config, image, brain, geom, modalities, case_id: str, stored=None) -> tuple:
  """What the case's pseudo-label mixture says, where evaluation needs it -> (evidence: bool, p:
  bool[X', Y', Z'], f32[X', Y', Z'] or None).

  evidence: False when the mixture found no lesion evidence (its status 'no_lesion_evidence',
  gmm.min_contrast) and the case-level gate (eval.gate_on_p_evidence) is on; otherwise True.
  p: the case's P on the prepared grid when eval.border_mm > 0 (the border refinement) or
  eval.edge_mm > 0 (the edge rule), else None;
  with eval.border_symmetry, f32 with 0.5 (no say: morphology.refine_border) on P's left-right
  symmetric voxels (morphology.case_symmetric_lesion, the voxels training leaves out), 1 on P's
  other lesion voxels, 0 elsewhere.
  stored: (report, p) from the pseudo-label stage when the case has them (p None when not read);
  otherwise (new scans) the mixture consensus is fitted now, as the stage would.
  """
  gmm_source = config.pseudo_labels.source == 'gmm'
  gate = bool(config.eval.gate_on_p_evidence) and gmm_source
  border = (config.eval.get('border_mm', 0.0) > 0 or
            config.eval.get('edge_mm', 0.0) > 0) and gmm_source
  if not (gate or border):
    return True, None
  report, p = stored if stored is not None else (None, None)
  if report is None or (border and p is None):
    _, p, report = gmm.consensus(np.asarray(image, np.float32), np.asarray(brain) > 0,
                                 list(modalities), config.gmm, case_id, geom.spacing,
                                 gmm.hu_scale(config))
  evidence = not gate or report.get('status') != 'no_lesion_evidence'
  if not border:
    return evidence, None
  p = np.asarray(p) > 0
  if config.eval.get('border_symmetry', False):
    sym = morphology.case_symmetric_lesion(case_id, p, image, brain, modalities, config.train)
    p = np.where(sym, np.float32(0.5), p.astype(np.float32))
  return evidence, p


def segment_prepared(config, predictor, params, image, brain, geom, evidence: bool = True,
                     p=None, weigh=None):
  """One prepared case -> (lesion probability f32[X', Y', Z'] on the prepared grid, inside the brain
  and after the rules of config.eval; mask u8 on the ORIGINAL grid). `params`: one network's, or a
  list of networks' (their probabilities are averaged before the rules, or combined with the
  weights weigh(list of f32[X', Y', Z']) -> list of floats summing to 1).
  evidence=False (the case-level gate said no lesion): an empty mask. p: the case's P (bool, the
  prepared grid; case_mixture) for eval.border_mm: voxels within that many mm of the border of the
  network's mask (after the component rules) take P's side (morphology.refine_border), then the
  component rules run again; for eval.edge_mm: the network's components that P does not touch and
  that lie mostly within that many mm of the brain's edge are dropped
  (morphology.drop_edge_components). The network does not run when evidence is False."""
  if not evidence:
    prob = np.zeros(np.shape(brain), np.float32)
    return prob, geometry.prob_to_original_mask(prob, geom)
  members = params if isinstance(params, list) else [params]
  image = np.asarray(image, np.float32)
  probs = [predictor.predict_volume(p_, image) for p_ in members]
  weights = weigh(probs) if weigh is not None else [1.0 / len(probs)] * len(probs)
  prob = sum(np.float32(w) * q for w, q in zip(weights, probs))
  prob = prob * (np.asarray(brain) > 0)
  e = config.eval
  rules = lambda q: morphology.filter_components(q, geom.spacing, e.min_component_mm3,
                                                 e.min_component_probability, e.keep_fraction)
  prob = rules(prob)
  if p is not None and e.get('border_mm', 0.0) > 0:
    prob = rules(morphology.refine_border(prob, p, geom.spacing, e.border_mm,
                                          side=e.get('border_side', 'clamp')))
  if p is not None and e.get('edge_mm', 0.0) > 0:
    prob = morphology.drop_edge_components(prob, p, brain, geom.spacing, e.edge_mm)
  return prob, geometry.prob_to_original_mask(prob, geom)


def predict_cases(config, prep: store_lib.Store, cases, nets, predictor, out_dir, labels=None):
  """Predicts every case; returns {case: (prob on prepared grid, mask on original grid)}. Writes
  out_dir/<case>.nii.gz (and <case>_prob.nii.gz with eval.save_probabilities) and
  out_dir/statistics.csv (metrics.lesion_statistics per case).
  nets: restore_networks' list; a case is segmented by the mean of all of them
  (eval.fold_networks = 'all'), or of those that did not train on it ('unseen': folds.members_for;
  all of them for a new scan), or both weighed by P's agreement with the unseen ones ('agreement':
  agreement_weights; the unseen networks alone where the case has no stored P).
  labels: the pseudo-label store where the P stage ran (a case's report and P are reused from it;
  case_mixture)."""
  out, stats = {}, []
  gated = bool(config.eval.gate_on_p_evidence) and config.pseudo_labels.source == 'gmm'
  t0 = time.time()
  for i, c in enumerate(cases):
    meta = prep.meta(c)
    geom = geometry.Geometry.from_json(meta['geometry'])
    image = np.asarray(prep.read(c, 'image', config.data.verify_checksums), np.float32)
    brain = np.asarray(prep.read(c, 'brain')) > 0
    stored, own_p = None, None
    mode = config.eval.get('fold_networks', 'all')
    if labels is not None and labels.is_complete(c):
      if config.eval.get('border_mm', 0.0) > 0 or config.eval.get('edge_mm', 0.0) > 0 or \
          mode == 'agreement':
        own_p = labels.read(c, 'p', config.data.verify_checksums)
      stored = (labels.meta(c)['report'], own_p)
    evidence, p = case_mixture(config, image, brain, geom, meta['modalities'], c, stored)
    members, weigh = [params for params, _ in nets], None
    if mode in ('unseen', 'agreement'):
      unseen = folds_lib.members_for(c, [seen for _, seen in nets])
      if mode == 'agreement' and own_p is not None and len(unseen) < len(nets):
        order = unseen + [i for i in range(len(nets)) if i not in unseen]
        members = [nets[i][0] for i in order]
        weigh = agreement_weights(np.asarray(own_p) > 0, len(unseen), brain, case=c)
      else:
        members = [nets[i][0] for i in unseen]
    prob, mask = segment_prepared(config, predictor, members, image, brain, geom, evidence, p,
                                  weigh)
    if distributed.is_main():
      nifti.write_mask(mask, geom, meta, os.path.join(out_dir, f'{c}.nii.gz'))
      write_dicom_seg(config, mask, meta, os.path.join(out_dir, f'{c}.dcm'))
      if config.eval.get('save_probabilities',
                         False):  # lesion probability on the original grid (0 outside)
        nifti.write_image(geometry.to_original(prob.astype(np.float32), geom, order=1), geom, meta,
                          os.path.join(out_dir, f'{c}_prob.nii.gz'))
    out[c] = (prob, mask)
    gate = 'off' if not gated else ('lesion' if evidence else 'no_lesion_evidence')
    row = metrics.lesion_statistics(c, mask, geom.original_spacing, prob, gate)
    if p is not None and evidence:  # how much of the case's own P the network agrees with
      row['p_agreement'] = round(metrics.dice(prob > 0.5, np.asarray(p) > 0), 4)
    stats.append(row)
    el = time.time() - t0
    logging.info('predict: %d/%d cases (%.2f case/s, ETA %.0fs) %s%s', i + 1, len(cases),
                 (i + 1) / el, (len(cases) - i - 1) * el / (i + 1), c,
                 '' if evidence else ' (no lesion evidence: empty mask)')
  if distributed.is_main() and cases:
    write_statistics(stats, os.path.join(out_dir, 'statistics.csv'))
  return out


def write_dicom_seg(config, mask, meta: dict, path: str):
  """With eval.output_format = 'dicom_seg' and a case read from DICOM series: the mask (u8, the
  original grid) also as a DICOM-SEG referencing the first modality's series (imaging.dicom)."""
  if config.eval.get('output_format', 'nifti') != 'dicom_seg':
    return
  first = meta.get('files', {}).get('images', {}).get(meta['modalities'][0], '')
  if not os.path.isdir(first):
    logging.info('%s: not a DICOM series, so no DICOM-SEG (the NIfTI mask is written)', first)
    return
  from cgc_jax import __version__  # pylint: disable=g-import-not-at-top
  from cgc_jax.imaging import dicom  # pylint: disable=g-import-not-at-top
  try:
    dicom.write_seg(mask, first, path, __version__)
  except Exception as e:  # pylint: disable=broad-except  (highdicom checks the sources' headers)
    logging.warning('%s: DICOM-SEG not written (%s: %s); the NIfTI mask is', first,
                    type(e).__name__, e)


def agreement_weights(p, n_unseen: int, brain, case: str = ''):
  """The weights of eval.fold_networks = 'agreement' for members ordered unseen first: a = Dice of
  the unseen networks' mean mask (> 0.5, inside `brain`) with the case's own P (bool[X', Y', Z']);
  the networks that trained on the case share a, those that never saw it 1 - a. A network that never
  saw a case's P can only agree with it where the other cases' P agree, so a is a label-free
  reading of how far P, and with it the networks that fitted P, can be trusted on this case: a
  failed P hands the case to the unseen networks, a good one to the networks that learned it. No
  threshold to choose."""
  inside = np.asarray(brain) > 0

  def weigh(probs):
    unseen = sum(probs[:n_unseen]) / n_unseen
    a = float(metrics.dice((unseen > 0.5) & inside, p & inside))
    n_seen = len(probs) - n_unseen
    logging.info('agreement %s: the unseen networks agree with P at %.3f (weight of the %d that saw'
                 ' it)', case, a, n_seen)
    return [(1.0 - a) / n_unseen] * n_unseen + [a / n_seen] * n_seen

  return weigh


def write_statistics(rows: list, path: str):
  """statistics.csv (metrics.STATISTICS columns and p_agreement, one row per case), written
  atomically. p_agreement: Dice between the network's mask and the case's own P on the prepared
  grid, where the edge rule fitted P (eval.border_mm > 0): a label-free flag of a case whose P
  failed (on the 20 development cases its rank correlation with P's Dice was 0.91), '' without P."""
  buf = io.StringIO()
  w = csv.DictWriter(buf, metrics.STATISTICS + ('p_agreement',), restval='')
  w.writeheader()
  w.writerows(rows)
  store_lib.atomic_write_text(path, buf.getvalue())
