"""Shared defaults for every cgc_jax config: each number used by the code lives here or in a config.

Configs import `base_config()` and override what differs. Any field can be overridden on the command
line: `--config.train.steps=200`.
"""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # ---------------------------------------------------------------- data (prepare stage)
  c.data = d = ml_collections.ConfigDict()
  # brats | folder | cq500 | phantoms (generated into WORKDIR/phantoms, brats layout)
  d.layout = 'brats'
  d.root = ''  # dataset root (not used by layout=phantoms)
  # More folders of scans in the same layout (or nnU-Net raw folders) that join the training pool:
  # prepared, pseudo-labelled, trained on and segmented like the root's cases; their label files are
  # never read, so they are never scored. Case ids must differ from the root's.
  d.extra_roots = ()
  d.modalities = ('flair', 't1', 't1ce', 't2')  # channel order; any subset the layout provides
  # Filenames per modality for the folder and cq500 layouts ('{case}' is the case id).
  d.filenames = ml_collections.ConfigDict(
      {'flair': '{case}_flair.nii.gz', 't1': '{case}_t1.nii.gz', 't1ce': '{case}_t1ce.nii.gz',
       't2': '{case}_t2.nii.gz', 'ct': '{case}_ct.nii.gz'})
  d.label = '{case}_seg.nii.gz'  # label filename; '' = no labels
  d.label_values = (0, 1, 2, 4)  # allowed label values; lesion = label > 0
  d.kind = 'mri'  # mri | ct: decides brain mask and normalisation
  d.target_spacing = (2.0, 2.0, 2.0)  # mm, or () to keep the native spacing
  d.crop_margin_mm = 6.0  # margin around the brain bounding box
  # Low-pass filter images (within the brain) before down-sampling them to target_spacing, so a
  # 2 mm voxel averages its 1 mm voxels instead of keeping every second one and its full noise.
  d.antialias = False
  # MRI bias-field correction before anything else: 'none' | 'n4' (N4 through SimpleITK, fitted on
  # the brain at 1/n4_shrink resolution, n4_iterations per fitting level; pip install SimpleITK).
  # One level: a field smooth over the whole head. ITK's usual three levels refine it to ~2 cm and
  # take large tumours for field (P 0.785 -> 0.642 on the 20 development cases, docs/results.md).
  d.bias_field = 'none'
  d.n4_shrink = 4
  d.n4_iterations = (100,)
  d.store_dtype = 'float16'  # dtype of prepared images on disk
  d.strict_geometry = False  # affine mismatch between channels: warning (False) or error (True)
  d.affine_tolerance = 1e-3  # max abs difference between affines counted as "equal"
  d.num_workers = 2  # CPU worker processes for offline stages (0 or 1 = in-process)
  d.verify_checksums = True  # check every array's crc32 when a case is opened
  # A brain mask that looks like the field of view (a scan not brain-extracted, or a noisy outside):
  # a warning naming the file, or an error with strict_brain_mask. It covers more than this
  # fraction of the volume, or reaches this many of the 6 faces, or (CT) more than ct_bone_fraction
  # of it is above ct_bone_hu. Brain-extracted BraTS scans: 10-20% of the volume, no face.
  d.strict_brain_mask = False
  d.raw_scan_coverage = 0.6
  d.raw_scan_faces = 4
  d.ct_bone_hu = 300.0
  d.ct_bone_fraction = 0.03
  # CT only.
  d.ct_window = (0.0, 100.0)  # HU window clipped to, then scaled to [0, 1]
  d.ct_brain_extracted = True  # False: approximate HU-window brain mask (flagged in the log)
  d.ct_background_below = -500.0  # brain-extracted CT: voxels below this HU are background
  d.ct_approx_brain_window = (-20.0, 100.0)  # HU window for the approximate brain mask

  # Phantom generator (layout=phantoms).
  d.phantoms = p = ml_collections.ConfigDict()
  p.num_subjects = 10  # subjects written
  p.lesion_free = 1  # how many of them have no lesion
  p.seed = 0  # generator seed
  p.kind = 'mri'  # mri (BraTS-like, 4 modalities, labels 1/2/4) | ct (CQ500-like, HU)
  p.spacing = (2.0, 2.0, 2.0)  # written voxel size in mm (template is 2 mm)
  p.noise = 0.06  # Gaussian noise sigma, relative to white-matter intensity (MRI)
  p.bias = 0.15  # multiplicative bias field amplitude
  p.blur = 0.7  # partial-volume blur sigma, voxels
  p.deform_mm = 4.0  # random smooth deformation amplitude
  # CT: > 0 puts patches of this HU on the brain's outer 4 mm (what brain extraction leaves of skull
  # and dura; not a lesion) in every subject
  p.ct_rim_hu = 0.0
  # MRI lesions per subject: 1 (a glioma of 10-22 mm semi-axes), or this many smaller ones with
  # semi-axes in lesion_radius voxels of 2 mm (8-14 mm: at 2.5-4.5 voxels every P recipe of the
  # pseudo_labels table stays under Dice 0.2 at 3 mm), alternating between the hemispheres
  p.lesions = 1
  p.lesion_radius = (4.0, 7.0)

  # ---------------------------------------------------------------- GMM pseudo-labels
  c.gmm = g = ml_collections.ConfigDict()
  g.k = 4  # mixture components (MRI: CSF, GM, WM, lesion)
  g.channels = ('flair', 't1')  # channels the mixture sees (subset of data.modalities)
  g.subsample = 20000  # brain voxels the k-means start is computed on
  g.bins = 128  # per-channel quantisation levels of the compressed all-voxel fit (see gmm.py)
  g.seed = 0  # subsample and initialisation seed (per case: folded with the case id)
  g.threshold = 0.5  # P = lesion posterior > threshold
  g.lesion_channel = 'flair'  # lesion-bright channel
  g.rule = 'max_mean'  # max_mean: highest mean in lesion_channel | hu_range: mean inside g.hu_range
  # rule 'signature': among the components brighter than the brain's average in lesion_channel,
  # the one of highest sum of weight x mean over these channels (z-scores; MRI)
  g.signature = ('flair:1', 't2:1', 't1:-1')
  g.hu_range = (50.0, 90.0)  # hu_range rule: lesion components have their HU mean in this range
  # Consensus of mixtures: 'channels:K' members (e.g. 'flair,t1:4'); () = the one mixture above.
  # Members naming a channel the data lack are skipped. P = voxels >= `vote` of the members mark.
  g.ensemble = ()
  g.vote = 0.5
  g.grow_mm = 0.0  # grow the voted P by this many mm (the mixture's P stops short of faint edges)
  g.min_component_voxels = 0  # drop connected components of P smaller than this (0 = keep all)
  # Spatial cleanup of P (morphology.cleanup), in this order. The defaults leave P as the mixture
  # gives it; configs for real scans switch them on.
  g.open_iterations = 0  # binary opening (6-neighbour cross) iterations: cuts rims and bridges
  g.keep_fraction = 0.0  # keep components >= this x the largest (0 = all)
  # > 0: the voted components lying mostly within this many mm of the brain's edge are dropped
  # (what brain extraction leaves of skull and dura on CT; an extra-axial bleed there goes too)
  g.edge_mm = 0.0
  # MRI: before the mixtures are fitted, each channel's brain intensities are mapped so that the
  # case's percentiles (1, 10, ..., 90, 99) land on the mean percentiles of the run's cases
  # (Nyul-Udupa histogram standardisation; gmm.standardise). Training data only: new scans at
  # prediction time are fitted as they are.
  g.standardise = False
  g.fill_holes = False  # fill enclosed holes (3D and per slice): necrotic cores inside oedema
  # Case-level lesion evidence: P is emptied when the lesion channel inside raw P exceeds the ring
  # of tissue around it by less than this (z units for MRI, window units for CT); -inf = off.
  g.min_contrast = float('-inf')
  g.ring_voxels = 2  # width of that ring
  g.kmeans_inits = 5  # k-means starts for the EM initialisation (best inertia kept)
  g.reg_covar = 1e-4  # covariance regulariser; raised x10 on singular covariance
  g.max_iter = 200  # EM iterations
  g.tol = 1e-4  # EM convergence tolerance
  g.retries = 3  # re-seeded retries on non-convergence / singular covariance

  c.pseudo_labels = pl = ml_collections.ConfigDict()
  pl.source = 'gmm'  # gmm | threshold | nifti | ground_truth
  pl.nifti_dir = ''  # source=nifti: folder of <case>.nii.gz masks on each case's original grid
  pl.threshold_z = 2.0  # source=threshold: lesion-channel z-score above this is lesion
  pl.export_nifti = True  # write P on each case's original grid to pseudo_labels/nifti/

  # ---------------------------------------------------------------- model
  c.model = m = ml_collections.ConfigDict()
  m.base = 8  # U-Net width of level 0; level i has base * 2**i channels
  m.levels = 4  # resolution levels (levels - 1 poolings)
  m.norm = 'instance'  # instance | group (batch-independent: no cross-device statistics)
  m.groups = 8  # group norm groups
  # 3x3x3 conv: auto | sum2d | native | onednn (auto: onednn on CPU where it builds, else sum2d;
  # native on accelerators)
  m.conv_impl = 'auto'
  m.dtype = 'float32'  # compute dtype (bfloat16 on accelerators); parameters stay float32
  m.coarse_hidden = 64  # coarse-grained classifier hidden width
  m.proj_hidden = 128  # projection head hidden width
  m.proj_dim = 128  # projection output d (L2-normalised)

  # ---------------------------------------------------------------- CGC module
  c.cgc = k = ml_collections.ConfigDict()
  k.coarse = True  # global granularity (coarse-grained discrimination)
  k.fine = True  # local granularity (fine-grained contrastive)
  k.lambda_coarse = 0.1  # weight of the coarse loss
  k.lambda_fine = 0.1  # weight of the fine loss
  k.patch = (6, 6, 2)  # mini-patch size z in bottleneck cells
  k.tau = 0.2  # SupCon temperature
  # fine anchors: patch = per mini-patch the mean of its lesion cells and of its normal cells,
  # contrasted over the global batch (the paper); cell = every cell, contrasted only with the
  # cells of its own mini-patch, at mini-patches holding both classes (hard, local negatives)
  k.fine_anchors = 'patch'
  k.cell_threshold = 0.5  # a bottleneck cell is lesion when its P fraction >= this
  k.normal_in_brain = True  # normal cells must be inside the brain (else padding counts as normal)

  # ---------------------------------------------------------------- training
  c.train = t = ml_collections.ConfigDict()
  t.seed = 0
  t.steps = 100  # total optimiser steps
  t.batch_size = 2  # GLOBAL batch (crops per step over all devices)
  t.crop = (96, 96, 64)  # training crop (voxels); divisible by 2**(levels-1)
  t.fg_fraction = 1.0 / 3.0  # fraction of crops centred on a P-lesion voxel
  t.flip = True  # random flips along each axis
  t.intensity_scale = 0.1  # per-channel multiplicative jitter (+-)
  t.intensity_shift = 0.1  # per-channel additive jitter (+-, z-score units)
  # Rotation and zoom (off at 0): this fraction of crops is read from the scan rotated by up to
  # rotate_deg about each axis (rigid in mm) and zoomed by a factor drawn in `zoom` (>1 magnifies);
  # image linear, P and brain nearest. Costs host time (~0.4 s a 80x96x72x4 crop on one core).
  t.spatial_p = 0.0
  t.rotate_deg = 15.0
  t.zoom = (0.85, 1.15)
  t.loss_region = 'brain'  # brain: cross-entropy inside the brain mask only | all
  t.dice_weight = 1.0  # soft-Dice term added to the cross-entropy on P (0 = the paper's CE only)
  # Learning from noisy P (all off by default = the paper's recipe plus soft Dice):
  t.gce_q = 0.0  # >0: generalised cross-entropy with this q instead of cross-entropy (q=1: MAE)
  t.bootstrap = 0.0  # >0: target = (1 - b) * P + b * the network's own hard decision
  t.confidence_gamma = 0.0  # >0: voxel weight |2 * posterior - 1| ** gamma (unsure P counts less)
  # >0: voxels of P whose left-right mirror image is also P and whose symmetry_modality (smoothed by
  # a Gaussian of symmetry_sigma voxels) is less than this many z-units brighter than the mirror's
  # get no weight in the segmentation loss (morphology.symmetric_lesion): normal tissue that P
  # takes for lesion on both sides. For one-sided lesions (gliomas), not for bilateral ones.
  t.symmetry_margin = 0.0
  t.symmetry_modality = 'flair'
  # >0 (s, at most 1): each case's segmentation loss is weighed by 1 - s + s x the label-free
  # quality score of its P (labels.quality: the rank among the cases of its mixtures' agreement,
  # ring contrast, compactness and roundness), so cases whose P looks worst teach the least
  t.quality_weight = 0.0
  t.symmetry_sigma = 1.0
  # >0: early-learning regularisation, lambda * log(1 - <prob, teacher prob>) with a teacher whose
  # weights are the moving average (decay elr_decay per step) of the network's own
  t.elr_lambda = 0.0
  t.elr_decay = 0.97
  # >0: ADELE-style target correction: from correct_start x steps on, voxels where the network's
  # lesion probability is above this (or below 1 - this) take its own decision as the target
  t.correct_threshold = 0.0
  t.correct_start = 0.5
  # Cross-fitting (1 = off): this many networks, network f trained on every case but those of fold
  # f (case i of the sorted ids is in fold i mod folds), segmenting as their mean
  # (eval.fold_networks says which of them segment a training case). Costs folds x the training
  # and the inference.
  t.folds = 1
  # An ensemble (1 = off): this many networks, each on every case, network m with seed
  # train.seed + 1000 m, segmenting as their mean (nnU-Net ensembles its folds' networks the same
  # way). Network 0 is the one-network run in WORKDIR; the others live in WORKDIR/ensemble/<m>.
  # Costs ensemble x the training and the inference.
  t.ensemble = 1
  # With an ensemble: what network 0 (trained on every case's P) tells networks m >= 1, label-free
  # (training/guide.py): 'none'; 'cases', each case's loss weighs the rank of network 0's agreement
  # with its P; 'voxels', the voxels where network 0's mask and P disagree weigh 0. Costs one
  # sliding-window pass of network 0 over the training cases.
  t.ensemble_guide = 'none'
  t.lr = 3e-3  # peak learning rate (AdamW)
  t.warmup_steps = 10
  t.end_lr_fraction = 0.05  # cosine decays to lr * this
  t.weight_decay = 1e-4
  t.grad_clip = 1.0  # global-norm clip
  t.log_every = 5  # steps between progress lines / JSONL rows
  t.checkpoint_every = 25  # steps between async orbax saves
  # Checkpoints made with other train fields or from since-changed pseudo-labels: set aside in
  # WORKDIR/stale-<time>/ and training starts over (True), or an error naming the differences.
  t.restart_when_stale = True
  t.keep_checkpoints = 3  # checkpoints kept
  t.prefetch = 2  # batches prepared ahead by host threads
  t.num_workers = 2  # host threads making crops (an accelerator host: about one per core)
  # Where the crops are cut: 'host' (train.num_workers threads, from the memory-mapped shards),
  # 'device' (every training case held on every device, the host sending only each crop's random
  # draws: accelerators' steps outrun host threads; the same batches, more device memory; not
  # with train.spatial_p > 0) or 'auto': 'device' on GPUs and TPUs when the cases take at most
  # train.crops_device_memory of a device's memory, else 'host'. docs/benchmarks.md has the rates.
  t.crops_on = 'auto'
  t.crops_device_memory = 0.25

  # ---------------------------------------------------------------- evaluation / prediction
  c.eval = e = ml_collections.ConfigDict()
  e.step = -1  # checkpoint step to restore (-1 = as eval.select says)
  e.select = 'latest'  # latest | flip_agreement | confident_ce | p_agreement: with eval.step=-1,
  #                      the kept checkpoint whose tracked label-free signal is best (needs
  #                      eval.every_steps; see README "Training length")
  e.window = ()  # sliding window; () = train.crop
  e.overlap = 0.5  # window overlap fraction
  e.sigma_scale = 0.125  # Gaussian importance sigma = window * this
  e.tta_flip = False  # average over the 8 axis-flip combinations
  # >1: the network is the element-wise mean of the params of this many newest kept checkpoints
  # up to the evaluated one (weight averaging along one run: needs train.keep_checkpoints >= it)
  e.average_checkpoints = 0
  # train.folds >= 2: a training case is segmented by the mean of all the networks ('all'), of
  # those that never saw its P ('unseen'), or by both weighed per case ('agreement': a = Dice of the
  # unseen networks' mask with the case's P; the networks that saw it weigh a, the others 1 - a);
  # new scans always by all of them
  e.fold_networks = 'all'
  # nifti: <case>.nii.gz masks; dicom_seg: for cases read from DICOM series, also <case>.dcm, a
  # DICOM-SEG referencing the first modality's series (highdicom)
  e.output_format = 'nifti'
  e.package = ''  # predict: a model package (--model=FILE.zip) instead of the workdir's networks
  e.batch_size = 2  # windows per device call (rounded up to the device count)
  e.every_steps = 0  # >0: label-free signals (and Dice where ground truth exists, analysis only)
  #                    every N training steps, to WORKDIR/train/track.jsonl
  e.confident = 0.01  # track: P's confident voxels have posterior <= this or >= 1 - this
  e.pictures = True  # PNG overlays
  # Lesion-free scans stay empty: components of the network's mask smaller than this (mm^3) or with
  # a mean lesion probability below this are dropped before the mask is written (0 = keep all).
  e.min_component_mm3 = 0.0
  e.min_component_probability = 0.0
  # One-mass lesions (a glioma's whole tumour): components of the network's mask smaller than this
  # fraction of the largest are dropped too (0 = keep all; multifocal lesions, e.g. CT bleeds: 0).
  e.keep_fraction = 0.0
  # The lesion's edge from the case's own mixture: voxels within this many mm of the border of the
  # network's mask (after the component rules; either side) take P's side, then the component rules
  # run again (0 = off). The network says where the lesion is, the mixture fitted to this scan's
  # intensities where its edge runs. Needs pseudo_labels.source = gmm (new scans: fitted then).
  e.border_mm = 0.0
  # With border_mm: P's left-right symmetric voxels (train.symmetry_margin's rule, which training
  # leaves out of the loss) have no say in the band either; the network's value stays there.
  e.border_symmetry = False
  # With border_mm, the value a band voxel takes where P and the network disagree: 'clamp', just
  # past the threshold on P's side (0.51 / 0.49); 'reflect', the network's own probability
  # mirrored about the threshold (0.9 -> 0.1). Masks on a finer original grid are the probability
  # interpolated, so 'clamp' moves the edge most of a prepared voxel out of P's lesion (a voxel
  # at 0.49 beside one at 0.99 crosses 0.5 near itself); 'reflect' keeps it where the two voxels'
  # confidences put it, as P's own posterior does.
  e.border_side = 'clamp'
  # Components of the network's mask that P does not touch and that lie mostly within this many mm
  # of the brain's edge are dropped (0 = off): the bright rim brain extraction leaves on CT is
  # marked by a network where P marked nothing; a lesion P missed deep in the brain stays.
  e.edge_mm = 0.0
  # Case-level gate: where the pseudo-label mixture finds no lesion evidence (gmm.min_contrast), the
  # network's mask is emptied too (new scans: the mixture is fitted at prediction time).
  e.gate_on_p_evidence = False
  e.input_root = ''  # predict mode: new scans (a NIfTI file, a case folder, a folder of cases)
  e.output_dir = ''  # predict mode: where masks go ('' = WORKDIR/predict/masks)
  e.save_probabilities = False  # predict mode: also <case>_prob.nii.gz, lesion probability (f32)
  e.progress_every_s = 10.0  # a progress line per this many seconds while windows of a volume run
  # evaluate mode: score <case>.nii.gz masks from this folder instead of the network's
  e.predictions_dir = ''

  # ---------------------------------------------------------------- the run folder
  c.workdir = w = ml_collections.ConfigDict()
  w.min_free_gb = 1.0  # refuse to start with less free space than this in --workdir
  w.lock = True  # WORKDIR/.lock: a second run on the same workdir refuses to start

  # ---------------------------------------------------------------- multi-process start-up
  # Flags win over the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID);
  # SLURM and Cloud TPU pods are detected. None of this changes any stage's output.
  c.dist = s = ml_collections.ConfigDict()
  s.auto_detect = False  # True: let jax.distributed.initialize() detect the cluster (Cloud TPU VM
  #                       pods, GKE, SLURM, Open MPI); SLURM with >1 task is detected anyway
  s.coordinator_address = ''  # host:port of process 0; '' = from the environment / auto-detect
  s.num_processes = 0  # 0 = from the environment / auto-detect
  s.process_id = -1  # -1 = from the environment / auto-detect
  s.expected_devices = 0  # >0: stop at start-up unless jax.device_count() equals this
  s.init_timeout_s = 300  # wait this long for every process to join
  s.heartbeat_timeout_s = 100  # a process silent this long is dead: the others exit non-zero
  s.barrier_timeout_s = 3600  # offline stages: wait this long for the other processes' cases

  return c


# The pseudo-label recipe for real brain MRI (chosen on 20 BraTS 2018 development cases, checked on
# 5 others; docs/experiments/2026-11-30-pseudo-labels.md): a consensus of mixtures over three
# channel sets and K = 4, 5 (members whose channels a dataset lacks are skipped: FLAIR + T1 data
# keep two), each cleaned, majority-voted, grown by 2 mm (the mixture stops short of the faint
# oedema edge: recall 0.72 -> 0.86 at precision 0.87 -> 0.79) and hole-filled. T1ce is left out:
# enhancing rims and vessels give it bright non-lesion components (8 members with T1ce: 0.740
# against 0.785).
MRI_CONSENSUS = ('flair,t1:4', 'flair,t1:5', 'flair,t1,t2:4', 'flair,t1,t2:5', 'flair,t2:4',
                 'flair,t2:5')


def mri_pseudo_labels(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Sets the real-MRI pseudo-label recipe on config `c` (in place) and returns it."""
  g = c.gmm
  g.ensemble = MRI_CONSENSUS
  g.open_iterations = 1
  g.keep_fraction = 0.1
  g.fill_holes = True
  g.grow_mm = 2.0
  # Lesion evidence: every real lesion seen so far stands >= 0.69 z above its surroundings in FLAIR,
  # the brightest tissue of a lesion-free phantom brain 0.48-0.76: 0.5 only empties clear cases.
  g.min_contrast = 0.5
  c.eval.gate_on_p_evidence = True  # and the network's mask is emptied with it
  return c
