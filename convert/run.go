package convert

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/transmla/transmla/eval"
	"github.com/transmla/transmla/internal/atomicfile"
	"github.com/transmla/transmla/kernels"
	"github.com/transmla/transmla/model"
	ropepkg "github.com/transmla/transmla/rope"
	"github.com/transmla/transmla/safetensors"
	"github.com/transmla/transmla/tokenizer"
)

// Calibration selects the activation data of a calibrated conversion.
type Calibration struct {
	// File is the calibration text; never the evaluation text.
	File string
	// Tokens is how many tokens are run through the model.
	Tokens int
	// SeqLen is the length of each calibration sequence.
	SeqLen int
	// Seed fixes which sequences are drawn.
	Seed uint64
	// HoldOut keeps the file's last HoldOut tokens out of the calibration
	// sequences: a search scores its candidates on them.
	HoldOut int
}

// Job is one conversion of a checkpoint directory into a new one.
type Job struct {
	// Source is the GQA checkpoint directory; it is only read.
	Source string
	// Output is the directory to create.
	Output string
	// Force replaces an existing Output (only once the new one is complete).
	Force bool
	// Options are the conversion's choices.
	Options Options
	// DType is the stored dtype of the output: "bf16", "f16", "f32", or ""
	// for the source's.
	DType string
	// Calibration is nil for a data-free conversion.
	Calibration *Calibration
	// Refine, when not nil, fits each converted layer to the source's
	// attention output on the calibration sequences (needs Calibration).
	Refine *Refine
	// Backend computes the calibration forward pass.
	Backend kernels.Backend
	// Version is the tool version recorded in the metadata.
	Version string
	// Progress, when not nil, is told each layer's stage as it starts.
	// Layers are converted one ahead of the one being written, so its
	// calls may come from another goroutine; they never overlap.
	Progress func(Event)

	// prebuilt, when set, supplies the converted layers (a Plan's) in
	// place of reading, calibrating and converting the source's.
	prebuilt *prebuiltLayers

	// wrapWriter, when a test sets it, wraps the writer each output tensor
	// is written to, to inject write errors such as a full disk.
	wrapWriter func(io.Writer) io.Writer
}

// Event reports progress.
type Event struct {
	// Stage is one of the Stage constants.
	Stage string
	// Layer is the layer index the stage works on, of Layers in all.
	Layer, Layers int
	// Step of Steps and Loss report StageRefine's optimizer steps.
	Step, Steps int
	Loss        float64
}

// Progress stages of a layer, in order.
const (
	// StageCalibrate runs the source layer on the calibration states.
	StageCalibrate = "calibrate"
	// StageConvert decouples RoPE and factors the latent.
	StageConvert = "convert"
	// StageRefine fits the converted layer to the source's outputs, one
	// event per optimizer step.
	StageRefine = "refine"
	// StageWrite writes the converted layer's tensors.
	StageWrite = "write"
)

// Summary is what a conversion did.
type Summary struct {
	// Source and Output are the checkpoint directories.
	Source string `json:"source"`
	Output string `json:"output"`
	// Format is the export format, DType the stored dtype.
	Format string `json:"format"`
	DType  string `json:"dtype"`
	// Rank and RopeDim are kv_lora_rank and qk_rope_head_dim as stored,
	// LatentRank the latent dims that carry information: Rank less the
	// zero padding.
	Rank       int `json:"kv_lora_rank"`
	RopeDim    int `json:"qk_rope_head_dim"`
	LatentRank int `json:"latent_rank"`
	// Method describes the options in one line (also in the metadata).
	Method string `json:"method"`
	// CalibrationSHA256 identifies the calibration text ("" when data-free)
	// and CalibrationTokens counts the tokens run through the model.
	CalibrationSHA256 string `json:"calibration_sha256,omitempty"`
	CalibrationTokens int    `json:"calibration_tokens,omitempty"`
	// The KV cache per token over all layers, before and after, in values
	// and in bytes of DType, and the fraction saved.
	CacheValuesBefore int     `json:"cache_values_per_token_before"`
	CacheValuesAfter  int     `json:"cache_values_per_token_after"`
	CacheBytesBefore  int64   `json:"cache_bytes_per_token_before"`
	CacheBytesAfter   int64   `json:"cache_bytes_per_token_after"`
	Reduction         float64 `json:"cache_reduction"`
	// Seconds is the wall time of the whole conversion.
	Seconds float64 `json:"seconds"`
	// Copied lists the tokenizer and generation files copied from the source.
	Copied []string `json:"copied_files"`
	// Notes are approximations the user should know of.
	Notes []string `json:"notes,omitempty"`
	// Targets says which engines load the output, and their KV cache.
	Targets []TargetStatus `json:"targets"`
	// Layers reports each layer.
	Layers []LayerReport `json:"layers"`
}

// Method describes the options in one line, as recorded in the metadata.
func (o Options) Method(calibrated bool) string {
	latent := "svd"
	if calibrated {
		latent = "pca"
	}
	rope := o.RopeMethod
	var args []string
	if o.RopeStride != 0 {
		args = append(args, fmt.Sprintf("stride=%g", o.RopeStride))
	}
	if rope == ropepkg.MethodRoRoPE {
		args = append(args, fmt.Sprintf("freqfold=%d", o.FreqFold))
		if r := o.rank(calibrated); r != ropepkg.RankKey {
			args = append(args, "rank="+r)
		}
	}
	if len(args) > 0 {
		rope += "(" + strings.Join(args, ",") + ")"
	}
	// The position-free keys are read through their mean lost rotation,
	// averaged over the calibration's attention distances or, data-free,
	// over 0..nope-span.
	switch {
	case calibrated:
		rope += "+nope_fix(attention_profile)"
	case o.NopeSpan > 0:
		rope += fmt.Sprintf("+nope_fix(span=%g)", o.NopeSpan)
	}
	w := o.Weighting
	if w == WeightAttention && o.valueWeight() != 1 {
		w += fmt.Sprintf(",value_weight=%g", o.valueWeight())
	}
	return fmt.Sprintf("%s+%s(weighting=%s)", rope, latent, w)
}

// oneHeadRoPENote warns when the RoPE key is one head wide at one slot per
// frequency (d_r = head_dim, stride 1) for a source with several KV heads:
// all heads then share one rotating component per frequency and the other
// n_kv−1 lose their rotation. Where neighbouring frequencies are close,
// fractional strides keep more (two slots per fast frequency).
func oneHeadRoPENote(src model.Config, o Options) string {
	if o.ExactRoPE || src.NumKVHeads < 2 || o.RopeDim != src.HeadDim || (o.RopeStride != 0 && o.RopeStride != 1) {
		return ""
	}
	n := fmt.Sprintf("d_r = head_dim = %d: one RoPE key of a head's width, shared by all %d query heads, keeps one of the %d KV heads' rotating components per frequency", src.HeadDim, src.NumHeads, src.NumKVHeads)
	if math.Pow(src.Rope.Theta, 2/float64(src.HeadDim)) <= 4 {
		n += "; --cache searches wider keys with two or more slots per fast frequency (--rope-stride 1/2)"
	}
	return n
}

// Run converts job.Source into job.Output one layer at a time: each layer
// is read, calibrated (its attention inputs collected by running it on the
// calibration hidden states), converted and written; the next layer is
// read and converted while one is written. The tensors conversion does
// not change are copied from the source.
//
// The result is built in a temporary directory beside Output, named
// .OUTPUT.partial-*, and renamed to Output only when complete and synced;
// with Force an existing Output is replaced in one atomic exchange on
// Linux. An Output that is a symbolic link is kept and its target
// directory written instead (atomicfile.OutputDir). On error or
// cancellation the temporary directory is removed and Output is left as
// it was. A process killed outright (SIGKILL, power loss) may leave the
// temporary directory behind, never a partial Output; later runs ignore
// such leftovers, which are safe to delete.
func Run(ctx context.Context, job Job) (*Summary, error) {
	start := time.Now()
	reader, dt, err := openSource(job.Source, job.DType)
	if err != nil {
		return nil, err
	}
	defer reader.Close()
	src := reader.Config()
	opts, err := checkOptions(src, job.Options, dt)
	if err != nil {
		return nil, err
	}
	dst := TargetConfig(src, opts)
	if err := CheckOutput(job.Source, job.Output, job.Force, job.Calibration); err != nil {
		return nil, err
	}
	if job.Refine != nil && job.Calibration == nil {
		return nil, fmt.Errorf("refinement fits each layer on calibration sequences: give a calibration file")
	}
	be := job.Backend
	if be == nil {
		be = kernels.Gonum{}
	}

	streamCtx, cancel := context.WithCancel(ctx)
	st := &stream{ctx: streamCtx, cancel: cancel, job: job, reader: reader, src: src, dst: dst, opts: opts, be: be, attentionOnly: true, cur: -1}
	// Runs before the reader is closed: no conversion outlives Run.
	defer st.stop()
	sum := &Summary{Source: job.Source, Output: job.Output, Format: opts.Format, DType: dtypeName(dt),
		Rank: dst.MLA.KVLoraRank + dst.MLA.LatentPad, LatentRank: dst.MLA.KVLoraRank, RopeDim: dst.MLA.QKRopeHeadDim,
		Method: opts.Method(job.Calibration != nil), Targets: Compatibility(dst),
		CacheValuesBefore: src.KVCacheValuesPerToken(), CacheValuesAfter: dst.KVCacheValuesPerToken(),
		CacheBytesBefore: src.KVCacheBytesPerToken(dt), CacheBytesAfter: dst.KVCacheBytesPerToken(dt)}
	sum.Reduction = 1 - float64(sum.CacheValuesAfter)/float64(sum.CacheValuesBefore)
	if opts.Format == FormatStock && src.QKVBias {
		how := "folded into the weights through a linear stand-in for the constant 1 on the calibration inputs"
		if job.Calibration == nil {
			how = "dropped (no calibration data to fold them with)"
		}
		sum.Notes = append(sum.Notes, "the source's q/k/v biases have no place in the stock layout: "+how+"; the exact format keeps them")
	}
	if n := oneHeadRoPENote(src, job.Options); n != "" {
		sum.Notes = append(sum.Notes, n)
	}
	if p := dst.MLA.LatentPad; p > 0 {
		sum.Notes = append(sum.Notes, fmt.Sprintf("the latent of %d dims is stored padded with %d zero dims to kv_lora_rank %d: engines cache the padding (%d values per token and layer), transmla eval strips it (%d)",
			sum.LatentRank, p, sum.Rank, sum.Rank+sum.RopeDim, sum.LatentRank+sum.RopeDim))
	}
	if pb := job.prebuilt; pb != nil {
		sum.CalibrationSHA256, sum.CalibrationTokens = pb.calibrationSHA256, pb.calibrationTokens
		sum.Notes = append(sum.Notes, pb.notes...)
	}
	if c := job.Calibration; c != nil && (job.prebuilt == nil || job.Refine != nil) {
		// A Plan's layers were calibrated already; refining them runs the
		// same calibration sequences through the source once more.
		hash, err := st.prepareCalibration(c)
		if err != nil {
			return nil, err
		}
		if job.prebuilt == nil {
			sum.CalibrationSHA256 = hash
			sum.CalibrationTokens = len(st.seqs) * c.SeqLen
			sum.Notes = append(sum.Notes, st.notes...)
		}
		if r := job.Refine; r != nil {
			if st.refine, err = newRefiner(*r, dst, be, len(st.seqs), c.SeqLen); err != nil {
				return nil, err
			}
			sum.Method += r.Method(st.refine.seqs, c.SeqLen)
		}
	}

	tmp, err := atomicfile.TempDir(job.Output)
	if err != nil {
		return nil, err
	}
	committed := false
	defer func() {
		if !committed {
			os.RemoveAll(tmp)
		}
	}()
	specs, err := st.specs(dt)
	if err != nil {
		return nil, err
	}
	meta := map[string]string{
		"format":                    "pt",
		"transmla.source":           filepath.Base(filepath.Clean(job.Source)),
		"transmla.kv_lora_rank":     fmt.Sprint(sum.Rank),
		"transmla.qk_rope_head_dim": fmt.Sprint(sum.RopeDim),
		"transmla.method":           sum.Method,
		"transmla.format":           opts.Format,
		"transmla.version":          job.Version,
	}
	if sum.CalibrationSHA256 != "" {
		meta["transmla.calibration_sha256"] = sum.CalibrationSHA256
	}
	if src.NumLayers > 0 {
		st.startNext() // layer 0 is converted while the embeddings are written
	}
	if err := safetensors.WriteCheckpoint(ctx, tmp, specs, safetensors.WriteOptions{Metadata: meta, MaxShardBytes: 5 << 30}); err != nil {
		var se *sourceError
		switch {
		case ctx.Err() != nil && errors.Is(err, ctx.Err()):
			return nil, interrupted(ctx, job)
		case errors.As(err, &se):
			// Reported as what it is, not as a failed write of the
			// temporary file it surfaced in.
			return nil, se.err
		}
		return nil, err
	}
	extra := map[string]any{
		"torch_dtype": torchDType(dt),
		"transmla": map[string]any{
			"format":              opts.Format,
			"kv_a_layernorm":      dst.MLA.KVANorm,
			"q_bias":              dst.MLA.QBias,
			"kv_a_bias":           dst.MLA.KVABias,
			"source":              meta["transmla.source"],
			"source_architecture": src.Architecture,
			"method":              sum.Method,
			"calibration_sha256":  sum.CalibrationSHA256,
			"version":             job.Version,
		},
	}
	cfgJSON, err := model.DeepSeekV3Config(dst, extra)
	if err != nil {
		return nil, err
	}
	if err := atomicfile.WriteFile(filepath.Join(tmp, "config.json"), cfgJSON, 0o644); err != nil {
		return nil, err
	}
	if sum.Copied, err = copySideFiles(job.Source, tmp); err != nil {
		return nil, err
	}
	// MkdirTemp creates 0700; the result is an ordinary directory.
	if err := os.Chmod(tmp, 0o755); err != nil {
		return nil, fmt.Errorf("create output: %w", err)
	}
	// The files are synced; syncing their directory too means that after
	// a crash the renamed output holds all of them.
	if err := atomicfile.SyncDir(tmp); err != nil {
		return nil, fmt.Errorf("create output: %w", err)
	}
	// An interruption that came after the last tensor still wins over
	// the rename.
	if ctx.Err() != nil {
		return nil, interrupted(ctx, job)
	}
	if err := commitDir(tmp, job.Output, job.Force); err != nil {
		return nil, err
	}
	committed = true
	sum.Layers = st.reports
	sum.Seconds = time.Since(start).Seconds()
	return sum, nil
}

// interrupted is the error of a conversion stopped by ctx.
func interrupted(ctx context.Context, job Job) error {
	return fmt.Errorf("interrupted; %s is left as it was: %w", job.Output, ctx.Err())
}

// openSource opens the source checkpoint and resolves the stored dtype of
// the output: dtype (--dtype), or the source's when dtype is "".
func openSource(source, dtype string) (*model.Reader, safetensors.DType, error) {
	reader, err := model.OpenReader(source)
	if err != nil {
		return nil, 0, err
	}
	if dtype == "" {
		return reader, reader.StorageDType(), nil
	}
	dt, ok := parseDType(dtype)
	if !ok {
		reader.Close()
		return nil, 0, fmt.Errorf("--dtype %q is not one of bf16, f16, f32", dtype)
	}
	return reader, dt, nil
}

// checkOptions validates opts for a written conversion of src stored as
// dt and fills in the default format.
func checkOptions(src model.Config, opts Options, dt safetensors.DType) (Options, error) {
	if opts.Format == "" {
		opts.Format = DefaultFormat
	}
	if err := opts.Validate(src); err != nil {
		return opts, err
	}
	if opts.ExactRoPE {
		return opts, errors.New("the exact-RoPE anchor has no file format")
	}
	if opts.Format == FormatStock && dt == safetensors.F16 {
		// The stock latent is scaled far below 1 (see shrinkLatent); its
		// weights would underflow f16's range.
		return opts, ErrStockF16
	}
	// The config is written last: what it cannot express (a sliding
	// window, say) must fail before the layers are converted.
	if _, err := model.DeepSeekV3Config(TargetConfig(src, opts), nil); err != nil {
		return opts, err
	}
	return opts, nil
}

// ErrStockF16 is the refusal of the stock format stored as f16, which
// also meets an f16 source converted with the default format and dtype.
var ErrStockF16 = errors.New("--format deepseek-v3-stock (the default) cannot be stored as f16: its scaled-down latent weights underflow; pass --dtype bf16 or f32, or --format exact")

// CheckOutput refuses an output that is the source (or holds it, or lies
// inside it), that holds the calibration file (cal may be nil), that
// exists without force, or that is not a directory; see
// atomicfile.OutputDir for outputs that are symbolic links. Run checks it
// before any work; callers with work of their own before Run (a search)
// check it first too.
func CheckOutput(source, output string, force bool, cal *Calibration) error {
	if output == "" {
		return errors.New("no output directory (-o DIR)")
	}
	// Compared with their links resolved: replacing an output that is
	// the source, or holds it, under another name would delete it.
	if atomicfile.Inside(output, source) || atomicfile.Inside(source, output) {
		return fmt.Errorf("output %s is, contains or lies inside the source %s; convert never modifies its input", output, source)
	}
	if cal != nil && cal.File != "" && atomicfile.Inside(cal.File, output) {
		return fmt.Errorf("output %s holds the calibration file %s, which replacing it would delete; write the output elsewhere", output, cal.File)
	}
	_, exists, err := atomicfile.OutputDir(output)
	if err != nil {
		return err
	}
	if exists && !force {
		return fmt.Errorf("output %s exists; pass --force to replace it", output)
	}
	return nil
}

// commitDir moves the finished temporary directory into place (see
// atomicfile.CommitDir) and syncs its parent.
func commitDir(tmp, output string, force bool) error {
	err := atomicfile.CommitDir(tmp, output, force)
	if errors.Is(err, atomicfile.ErrOutputExists) {
		return fmt.Errorf("output %s appeared during the conversion; pass --force to replace it", output)
	}
	return err
}

// stream converts layers in order for a writer that asks for them in
// order: while layer i is written, layer i+1 is converted in the
// background, so at most two converted layers and one source layer are
// held at a time.
type stream struct {
	ctx context.Context
	// cancel stops a background conversion when the write ends early.
	cancel   context.CancelFunc
	job      Job
	reader   *model.Reader
	src, dst model.Config
	opts     Options
	be       kernels.Backend

	// Calibration state: the hidden states of every sequence after the
	// layers converted so far; heldOut are the tokens kept out of them, and
	// notes what the user should know of the calibration text.
	seqs    [][]int
	hidden  []float32
	runner  *eval.LayerRunner
	heldOut []int
	notes   []string
	// refine, when not nil, refines each converted layer.
	refine *refiner

	// attentionOnly lets a data-free conversion read only the attention
	// tensors of each layer: the others are written from the source.
	attentionOnly bool

	cur     int
	layer   *model.Layer
	reports []LayerReport
	// ahead delivers the conversion of layer cur+1 once started.
	ahead   chan converted
	workers sync.WaitGroup
	// progressMu keeps the writer's and the background conversion's
	// Progress calls apart.
	progressMu sync.Mutex
}

// converted is the result of a background layer conversion.
type converted struct {
	layer *model.Layer
	rep   LayerReport
	err   error
}

// prepareCalibration tokenizes the calibration file and draws sequences.
func (s *stream) prepareCalibration(c *Calibration) (string, error) {
	text, err := os.ReadFile(c.File)
	if err != nil {
		return "", fmt.Errorf("calibration file: %w", err)
	}
	sum := sha256.Sum256(text)
	tok, err := tokenizer.Load(filepath.Join(s.job.Source, "tokenizer.json"))
	if err != nil {
		return "", fmt.Errorf("calibration needs the source's tokenizer: %w", err)
	}
	if m := s.src.MaxPositionEmbeddings; m > 0 && c.SeqLen > m {
		return "", fmt.Errorf("--calib-seq %d exceeds the model's max_position_embeddings %d", c.SeqLen, m)
	}
	// Encoded as eval encodes text, special tokens included.
	ids := tok.Encode(string(text), true)
	if c.HoldOut > 0 {
		if len(ids) < c.HoldOut+c.SeqLen {
			return "", fmt.Errorf("calibration file %s: %d tokens, too few to hold %d out and calibrate on one sequence of %d", c.File, len(ids), c.HoldOut, c.SeqLen)
		}
		s.heldOut = ids[len(ids)-c.HoldOut:]
		ids = ids[:len(ids)-c.HoldOut]
	}
	s.seqs, err = CalibrationSequences(ids, c.Tokens, c.SeqLen, c.Seed)
	if err != nil {
		return "", fmt.Errorf("calibration file %s: %w", c.File, err)
	}
	if slots := len(ids) / c.SeqLen; slots < len(s.seqs) {
		s.notes = append(s.notes, fmt.Sprintf("the calibration text holds %d tokens (%d sequences of %d), fewer than the %d asked for: sequences overlap; a longer file calibrates better", len(ids), slots, c.SeqLen, len(s.seqs)*c.SeqLen))
	}
	if s.runner, err = eval.NewLayerRunner(s.src, s.be, c.SeqLen); err != nil {
		return "", fmt.Errorf("calibration: %w", err)
	}
	return hex.EncodeToString(sum[:]), nil
}

// get returns converted layer i; layers must be asked for in order. Once
// layer i is handed over, layer i+1 starts converting in the background.
func (s *stream) get(i int) (*model.Layer, error) {
	if i == s.cur {
		return s.layer, nil
	}
	if i != s.cur+1 {
		return nil, fmt.Errorf("layer %d asked for after layer %d", i, s.cur)
	}
	s.layer = nil // let the previous layer go before the next is converted
	if s.ahead == nil {
		s.startNext()
	}
	res := <-s.ahead
	s.ahead = nil
	if res.err != nil {
		return nil, res.err
	}
	res.rep.Layer = i
	s.reports = append(s.reports, res.rep)
	s.cur, s.layer = i, res.layer
	s.progress(StageWrite, i, s.src.NumLayers)
	if i+1 < s.src.NumLayers {
		s.startNext()
	}
	return res.layer, nil
}

// startNext starts converting layer cur+1 in the background.
func (s *stream) startNext() {
	i := s.cur + 1
	ch := make(chan converted, 1)
	s.ahead = ch
	s.workers.Add(1)
	go func() {
		defer s.workers.Done()
		// Collecting now, before the source layer is read, keeps the next
		// heap goal (twice the live heap at the last collection, by
		// default) near what is live: measured on Llama-3-8B-shaped
		// layers, peak RSS 2.0 GiB instead of 2.6 to 3.2 GiB, for
		// milliseconds per layer (the weights hold no pointers to scan).
		runtime.GC()
		l, rep, err := s.convert(i)
		if l != nil {
			// Only the new attention tensors are written from the
			// converted layer; dropping the rest (the source's MLP when
			// calibrating) keeps one source layer in memory, not two.
			// A refined o_proj is written from the layer too.
			l = &model.Layer{MLA: l.MLA, O: l.O}
		}
		ch <- converted{l, rep, err}
	}()
}

// stop cancels a background conversion, if any, and waits for it.
func (s *stream) stop() {
	s.cancel()
	s.workers.Wait()
}

// convert gives converted layer i: the job's prebuilt one, or the source's
// read, calibrated and converted.
func (s *stream) convert(i int) (*model.Layer, LayerReport, error) {
	pb := s.job.prebuilt
	if pb != nil && s.refine == nil {
		return pb.layer(i)
	}
	l, stats, err := s.source(i)
	if err != nil {
		return nil, LayerReport{}, err
	}
	var out *model.Layer
	var rep LayerReport
	if pb != nil {
		out, rep, err = pb.layer(i)
	} else {
		s.progress(StageConvert, i, s.src.NumLayers)
		out, rep, err = ConvertLayer(s.src, s.dst, s.opts, l, stats)
	}
	if err != nil {
		return nil, LayerReport{}, fmt.Errorf("layer %d: %w", i, err)
	}
	if s.refine != nil {
		rr, err := s.refine.refine(s.ctx, s.dst, l, out, func(step, steps int, loss float64) {
			s.event(Event{Stage: StageRefine, Layer: i, Layers: s.src.NumLayers, Step: step, Steps: steps, Loss: loss})
		})
		if err != nil {
			return nil, LayerReport{}, fmt.Errorf("layer %d: refine: %w", i, err)
		}
		rep.Refine = rr
	}
	return out, rep, nil
}

// source reads source layer i and, when calibrating, its statistics,
// moving the calibration states on past the layer; layers must be asked
// for in order.
func (s *stream) source(i int) (*model.Layer, *LayerStats, error) {
	read := s.reader.Layer
	if s.attentionOnly && s.seqs == nil {
		read = s.reader.AttentionLayer
	}
	l, err := read(s.ctx, i)
	if err != nil {
		return nil, nil, err
	}
	if s.seqs == nil {
		return l, nil, nil
	}
	s.progress(StageCalibrate, i, s.src.NumLayers)
	if s.hidden == nil {
		if s.hidden, err = s.embedCalibration(); err != nil {
			return nil, nil, err
		}
	}
	if s.refine != nil {
		if err := s.refine.capture(s.ctx, s.runner, s.src, l, s.hidden); err != nil {
			return nil, nil, fmt.Errorf("refine, layer %d: source attention: %w", i, err)
		}
	}
	// Running the source layer collects its inputs and moves the hidden
	// states on to the next layer's inputs.
	stats, err := layerStats(s.ctx, s.runner, s.be, s.src, l, s.hidden, len(s.seqs))
	if err != nil {
		return nil, nil, fmt.Errorf("calibration forward, layer %d: %w", i, err)
	}
	return l, stats, nil
}

func (s *stream) progress(stage string, i, n int) {
	s.event(Event{Stage: stage, Layer: i, Layers: n})
}

func (s *stream) event(ev Event) {
	if s.job.Progress != nil {
		s.progressMu.Lock()
		defer s.progressMu.Unlock()
		s.job.Progress(ev)
	}
}

func (s *stream) embedCalibration() ([]float32, error) {
	embed, err := s.reader.Embed()
	if err != nil {
		return nil, err
	}
	D := s.src.HiddenSize
	h := make([]float32, 0, len(s.seqs)*len(s.seqs[0])*D)
	for _, seq := range s.seqs {
		for _, t := range seq {
			if t < 0 || t >= s.src.VocabSize {
				return nil, fmt.Errorf("calibration token id %d is outside the vocabulary of %d", t, s.src.VocabSize)
			}
			h = append(h, embed[t*D:(t+1)*D]...)
		}
	}
	return h, nil
}

// sourceError marks a failure to read or convert the source, which
// WriteCheckpoint reports as a failure to write the tensor that needed it.
type sourceError struct{ err error }

func (e *sourceError) Error() string { return e.err.Error() }
func (e *sourceError) Unwrap() error { return e.err }

// specs plans every output tensor in Hugging Face's order. The tensors
// conversion does not change are passed on from the source as they are
// written; the others are converted, a layer at a time, when the first of
// its tensors is written.
func (s *stream) specs(dt safetensors.DType) ([]safetensors.TensorSpec, error) {
	get := func(i int) (*model.Layer, error) {
		l, err := s.get(i)
		if err != nil {
			return nil, &sourceError{err}
		}
		return l, nil
	}
	D := s.src.HiddenSize
	out := []safetensors.TensorSpec{s.kept("model.embed_tokens.weight", []int{s.src.VocabSize, D}, dt)}
	for i := range s.src.NumLayers {
		for _, t := range model.LayerTensorShapes(s.dst, i) {
			refinedO := s.refine != nil && s.refine.opts.Output && strings.Contains(t.Name, ".self_attn.o_proj.")
			if keptTensor(t.Name) && !refinedO {
				out = append(out, s.kept(t.Name, t.Shape, dt))
			} else {
				out = append(out, convertedTensor(s.dst, i, t, dt, get))
			}
		}
	}
	out = append(out, s.kept("model.norm.weight", []int{D}, dt))
	if !s.dst.TieWordEmbeddings {
		head := s.kept("lm_head.weight", []int{s.src.VocabSize, D}, dt)
		if s.src.TieWordEmbeddings {
			// An untied export of a tied source stores the embedding twice.
			head = s.kept("model.embed_tokens.weight", []int{s.src.VocabSize, D}, dt)
			head.Name = "lm_head.weight"
		}
		out = append(out, head)
	}
	if wrap := s.job.wrapWriter; wrap != nil {
		for i := range out {
			write := out[i].Write
			out[i].Write = func(w io.Writer) error { return write(wrap(w)) }
		}
	}
	return out, nil
}

// keptTensor reports whether the named output tensor is the source's
// unchanged: every tensor but the attention projections that MLA replaces
// (ConvertLayer keeps the norms, o_proj and the MLP).
func keptTensor(name string) bool {
	if !strings.HasPrefix(name, "model.layers.") {
		return true
	}
	return !strings.Contains(name, ".self_attn.") || strings.Contains(name, ".self_attn.o_proj.")
}

// kept plans the source's tensor name, passed on as dt
// (model.Reader.WriteTensor: byte for byte when the dtype stays).
func (s *stream) kept(name string, shape []int, dt safetensors.DType) safetensors.TensorSpec {
	return safetensors.TensorSpec{Name: name, DType: dt, Shape: shape, Write: func(w io.Writer) error {
		tw := &trackedWriter{w: w}
		err := s.reader.WriteTensor(s.ctx, name, dt, tw)
		if err != nil && !tw.failed {
			return &sourceError{err}
		}
		return err
	}}
}

// trackedWriter records whether a write to w failed, to tell the output's
// errors from the source's in a copy.
type trackedWriter struct {
	w      io.Writer
	failed bool
}

func (t *trackedWriter) Write(p []byte) (int, error) {
	n, err := t.w.Write(p)
	if err != nil {
		t.failed = true
	}
	return n, err
}

// parseDType maps --dtype's names to dtypes.
func parseDType(name string) (safetensors.DType, bool) {
	switch name {
	case "bf16":
		return safetensors.BF16, true
	case "f16":
		return safetensors.F16, true
	case "f32":
		return safetensors.F32, true
	}
	return 0, false
}

func dtypeName(dt safetensors.DType) string {
	for _, name := range []string{"bf16", "f16", "f32"} {
		if d, _ := parseDType(name); d == dt {
			return name
		}
	}
	return dt.String()
}

// torchDType is config.json's torch_dtype for dt.
func torchDType(dt safetensors.DType) string {
	switch dt {
	case safetensors.BF16:
		return "bfloat16"
	case safetensors.F16:
		return "float16"
	case safetensors.F64:
		return "float64"
	default:
		return "float32"
	}
}
