using LocalVllm.Engine.Cache;

namespace LocalVllm.Engine.Scheduling;

/// <summary>One sequence's share of a step: compute <see cref="NumNewTokens"/> tokens starting at its computed count.</summary>
public readonly record struct ScheduledSequence(Sequence Sequence, int NumNewTokens);

/// <summary>
/// Token-level scheduling in the style of vLLM V1: each step spends a budget of <c>MaxNumBatchedTokens</c> on running
/// sequences first (decodes and the next chunk of long prompts), then admits waiting ones in arrival order. When blocks
/// run out, the most recently admitted running sequence is preempted: its blocks are freed and it is recomputed later.
/// </summary>
public sealed class Scheduler
{
    private readonly BlockManager _blocks;
    private readonly LinkedList<Sequence> _waiting = new();
    private readonly List<Sequence> _running = [];

    public Scheduler(BlockManager blocks, int maxNumBatchedTokens, int maxNumSeqs)
    {
        _blocks = blocks;
        MaxNumBatchedTokens = maxNumBatchedTokens;
        MaxNumSeqs = maxNumSeqs;
    }

    public int MaxNumBatchedTokens { get; }
    public int MaxNumSeqs { get; }
    public int NumWaiting => _waiting.Count;
    public int NumRunning => _running.Count;
    public bool HasUnfinished => _waiting.Count > 0 || _running.Count > 0;
    /// <summary>Prompt tokens of admitted sequences, and how many of them the prefix cache served.</summary>
    public long AdmittedPromptTokens { get; private set; }
    /// <summary>Prompt tokens served from the prefix cache at admission.</summary>
    public long CachedPromptTokens { get; private set; }
    /// <summary>Preemptions since start.</summary>
    public long NumPreemptions { get; private set; }

    /// <summary>Queues a new sequence.</summary>
    public void Add(Sequence seq) => _waiting.AddLast(seq);

    /// <summary>Picks this step's work within the token budget.</summary>
    public List<ScheduledSequence> Schedule()
    {
        var scheduled = new List<ScheduledSequence>();
        int budget = MaxNumBatchedTokens;
        bool preempted = false;

        for (int i = 0; i < _running.Count && budget > 0;)
        {
            var seq = _running[i];
            int numNew = Math.Min(seq.NumTokens - seq.NumComputedTokens, budget);
            bool selfPreempted = false;
            while (!_blocks.CanAllocate(seq, [], seq.NumComputedTokens + numNew))
            {
                var victim = _running[^1];
                Preempt(victim);
                preempted = true;
                if (victim == seq) { selfPreempted = true; break; }
            }
            if (selfPreempted) break;
            _blocks.Allocate(seq, [], seq.NumComputedTokens + numNew);
            scheduled.Add(new ScheduledSequence(seq, numNew));
            budget -= numNew;
            i++;
        }

        while (!preempted && budget > 0 && _waiting.Count > 0 && _running.Count < MaxNumSeqs)
        {
            var seq = _waiting.First!.Value;
            var hits = seq.NumComputedTokens == 0 && seq.Sampling.PromptLogprobs is null ? _blocks.FindCachedPrefix(seq) : [];
            int computed = hits.Count * _blocks.BlockSize;
            int numNew = Math.Min(seq.NumTokens - computed, budget);
            if (!_blocks.CanAllocate(seq, hits, computed + numNew)) break; // first come, first served: do not skip ahead
            _blocks.Allocate(seq, hits, computed + numNew);
            if (seq.NumOutputTokens == 0 && seq.NumCachedPromptTokens == 0)
            {
                seq.NumCachedPromptTokens = computed;
                CachedPromptTokens += computed;
                AdmittedPromptTokens += seq.NumPromptTokens;
            }
            seq.NumComputedTokens = computed;
            seq.Status = SequenceStatus.Running;
            _waiting.RemoveFirst();
            _running.Add(seq);
            scheduled.Add(new ScheduledSequence(seq, numNew));
            budget -= numNew;
        }
        return scheduled;
    }

    /// <summary>Removes a finished or aborted sequence and releases its blocks.</summary>
    public void Finish(Sequence seq, string reason, object? stopReason = null)
    {
        seq.FinishReason = reason;
        seq.StopReason = stopReason;
        seq.Status = SequenceStatus.Finished;
        if (!_running.Remove(seq)) _waiting.Remove(seq);
        _blocks.Free(seq);
    }

    /// <summary>The sequences not yet finished (running first, then waiting).</summary>
    public IEnumerable<Sequence> Unfinished => _running.Concat(_waiting);

    private void Preempt(Sequence seq)
    {
        _running.Remove(seq);
        _blocks.Free(seq);
        seq.NumComputedTokens = 0;
        seq.Status = SequenceStatus.Waiting;
        _waiting.AddFirst(seq);
        NumPreemptions++;
    }
}
