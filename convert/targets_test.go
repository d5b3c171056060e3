package convert

import (
	"strings"
	"testing"

	"github.com/transmla/transmla/model"
	"github.com/transmla/transmla/rope"
)

func TestTargetPadTo(t *testing.T) {
	for _, tc := range []struct {
		target  string
		dc, dr  int
		want    int
		wantOK  bool
		accepts bool
	}{
		{"transformers", 192, 64, 192, true, true},
		{"vllm-cpu", 448, 64, 512, true, false},
		{"vllm-cpu", 512, 64, 512, true, true},
		{"vllm-cpu", 192, 128, 0, false, false},
		{"vllm-cpu", 600, 64, 0, false, false},
		{"vllm", 192, 64, 256, true, false},
		{"vllm", 300, 64, 448, true, false},
		{"vllm", 384, 128, 384, true, true},
		{"vllm", 320, 128, 384, true, false},
		{"flashmla", 256, 64, 512, true, false},
		{"flashmla", 384, 128, 0, false, false},
		{"vllm-cpu-mha", 100, 64, 100, true, true},
	} {
		tg, ok := LookupTarget(tc.target)
		if !ok {
			t.Fatalf("no target %q", tc.target)
		}
		got, ok := tg.PadTo(tc.dc, tc.dr)
		if got != tc.want || ok != tc.wantOK || tg.Accepts(tc.dc, tc.dr) != tc.accepts {
			t.Errorf("%s PadTo(%d, %d) = %d, %v, Accepts %v; want %d, %v, %v", tc.target, tc.dc, tc.dr, got, ok, tg.Accepts(tc.dc, tc.dr), tc.want, tc.wantOK, tc.accepts)
		}
	}
}

// The options convert takes with --target pad the latent and refuse what
// the engine cannot compute, naming the reason.
func TestTargetOptions(t *testing.T) {
	llama := model.Config{
		Architecture: "LlamaForCausalLM", HiddenSize: 768, IntermediateSize: 2048, NumLayers: 6, NumHeads: 6, NumKVHeads: 2,
		HeadDim: 128, VocabSize: 4096, MaxPositionEmbeddings: 2048, RMSNormEps: 1e-5, HiddenAct: "silu",
		Rope: rope.Params{Dim: 128, Theta: 500000}, BOSTokenID: -1,
	}
	llama3 := llama
	llama3.Rope.Scaling = rope.Scaling{Type: "llama3", Factor: 8, LowFreqFactor: 1, HighFreqFactor: 4, OriginalMaxPositionEmbeddings: 512}
	base := DefaultOptions(llama, 448)
	for _, tc := range []struct {
		name    string
		src     model.Config
		edit    func(*Options)
		pad     int    // the stored padding wanted
		wantErr string // "" for none
	}{
		{"any", llama, func(o *Options) {}, 0, ""},
		{"vllm-cpu pads to 512", llama, func(o *Options) { o.Target = "vllm-cpu" }, 64, ""},
		{"explicit padding", llama, func(o *Options) { o.PadLatent = 500 }, 52, ""},
		{"padding below the latent", llama, func(o *Options) { o.PadLatent = 100 }, 0, "at least the latent width 448"},
		{"vllm-cpu with rope-dim 128", llama, func(o *Options) { o.Target, o.RopeDim, o.Rank = "vllm-cpu", 128, 320 }, 0, "takes no latent with --rope-dim 128"},
		{"vllm with llama3 scaling", llama3, func(o *Options) { o.Target = "vllm" }, 0, "rope_scaling llama3"},
		{"transformers with llama3 scaling", llama3, func(o *Options) { o.Target = "transformers" }, 0, ""},
		{"engine and exact format", llama, func(o *Options) { o.Target, o.Format = "transformers", FormatExact }, 0, "read by transmla only"},
		{"unknown target", llama, func(o *Options) { o.Target = "tgi" }, 0, "is not one of"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := base
			tc.edit(&o)
			err := o.Validate(tc.src)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Validate: %v, want an error containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if pad := TargetConfig(tc.src, o).MLA.LatentPad; pad != tc.pad {
				t.Errorf("latent padding %d, want %d", pad, tc.pad)
			}
		})
	}
}

// Which engines load a converted config, and what they cache.
func TestCompatibility(t *testing.T) {
	llama := model.Config{
		Architecture: "LlamaForCausalLM", HiddenSize: 768, IntermediateSize: 2048, NumLayers: 6, NumHeads: 6, NumKVHeads: 2,
		HeadDim: 128, VocabSize: 4096, MaxPositionEmbeddings: 2048, RMSNormEps: 1e-5, HiddenAct: "silu",
		Rope: rope.Params{Dim: 128, Theta: 500000}, BOSTokenID: -1,
	}
	o := DefaultOptions(llama, 448)
	o.Target = "vllm-cpu"
	loads := map[string]int{}
	for _, st := range Compatibility(TargetConfig(llama, o)) {
		if st.Loads {
			loads[st.Name] = st.CacheValuesPerToken
		}
	}
	want := map[string]int{"transformers": 6 * 576, "vllm-cpu": 6 * 576, "vllm-cpu-mha": 6 * 2 * 6 * 192, "vllm": 6 * 576, "flashmla": 6 * 576}
	for name, cache := range want {
		if loads[name] != cache {
			t.Errorf("%s: loads with cache %d, want %d (all: %v)", name, loads[name], cache, loads)
		}
	}
	o.Format = FormatExact
	o.Target = ""
	for _, st := range Compatibility(TargetConfig(llama, o)) {
		if st.Loads {
			t.Errorf("%s loads the exact format", st.Name)
		}
	}
}
