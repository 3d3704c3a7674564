#nullable enable
using System;
using System.Collections.Generic;
using System.IO;
using System.Text;
using Microsoft.Build.Framework;
using Microsoft.Build.Utilities;

/// <summary>
/// Marks the GLIBCXX_* version needs of an ELF64 shared library weak when the host's libstdc++ lacks them,
/// so that the dynamic loader accepts the library (see LibStdCxxCompat.targets for why this is safe).
/// </summary>
public sealed class MarkMissingGlibcxxVersionsWeak : Task
{
    private const uint ShtGnuVerneed = 0x6ffffffe;
    private const ushort VerFlgWeak = 0x2;

    [Required]
    public ITaskItem[] Files { get; set; } = Array.Empty<ITaskItem>();

    public override bool Execute()
    {
        var hostLib = FindHostLibStdCxx();
        if (hostLib is null)
        {
            Log.LogMessage(MessageImportance.Low, "No host libstdc++.so.6 found; nothing to patch.");
            return true;
        }
        var hostText = Encoding.ASCII.GetString(File.ReadAllBytes(hostLib));
        foreach (var item in Files)
        {
            var path = item.ItemSpec;
            var patched = Patch(path, version => !hostText.Contains(version + "\0"));
            if (patched.Count > 0)
                Log.LogMessage(MessageImportance.High, $"{path}: marked {string.Join(", ", patched)} weak (host libstdc++ lacks them).");
        }
        return !Log.HasLoggedErrors;
    }

    private static string? FindHostLibStdCxx()
    {
        foreach (var dir in new[] { "/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/lib64", "/usr/lib" })
        {
            var candidate = Path.Combine(dir, "libstdc++.so.6");
            if (File.Exists(candidate)) return candidate;
        }
        return null;
    }

    private List<string> Patch(string path, Func<string, bool> hostLacks)
    {
        var changed = new List<string>();
        var bytes = File.ReadAllBytes(path);
        if (bytes.Length < 64 || bytes[0] != 0x7f || bytes[1] != (byte)'E' || bytes[4] != 2 || bytes[5] != 1)
        {
            Log.LogWarning($"{path} is not a little-endian ELF64 file; left unchanged.");
            return changed;
        }
        long shoff = (long)BitConverter.ToUInt64(bytes, 0x28);
        int shentsize = BitConverter.ToUInt16(bytes, 0x3A);
        int shnum = BitConverter.ToUInt16(bytes, 0x3C);
        for (int s = 0; s < shnum; s++)
        {
            long sh = shoff + (long)s * shentsize;
            if (BitConverter.ToUInt32(bytes, (int)sh + 4) != ShtGnuVerneed) continue;
            long offset = (long)BitConverter.ToUInt64(bytes, (int)sh + 24);
            uint strtabIndex = BitConverter.ToUInt32(bytes, (int)sh + 40);
            uint count = BitConverter.ToUInt32(bytes, (int)sh + 44);
            long strtab = (long)BitConverter.ToUInt64(bytes, (int)(shoff + strtabIndex * shentsize) + 24);
            long vn = offset;
            for (uint i = 0; i < count; i++)
            {
                int cnt = BitConverter.ToUInt16(bytes, (int)vn + 2);
                string file = ReadString(bytes, strtab + BitConverter.ToUInt32(bytes, (int)vn + 4));
                long aux = vn + BitConverter.ToUInt32(bytes, (int)vn + 8);
                for (int a = 0; a < cnt; a++)
                {
                    string name = ReadString(bytes, strtab + BitConverter.ToUInt32(bytes, (int)aux + 8));
                    ushort flags = BitConverter.ToUInt16(bytes, (int)aux + 4);
                    if (file.StartsWith("libstdc++", StringComparison.Ordinal) && name.StartsWith("GLIBCXX_", StringComparison.Ordinal)
                        && (flags & VerFlgWeak) == 0 && hostLacks(name))
                    {
                        BitConverter.GetBytes((ushort)(flags | VerFlgWeak)).CopyTo(bytes, (int)aux + 4);
                        changed.Add(name);
                    }
                    aux += BitConverter.ToUInt32(bytes, (int)aux + 12);
                }
                vn += BitConverter.ToUInt32(bytes, (int)vn + 12);
            }
        }
        if (changed.Count > 0)
        {
            var temp = path + ".patching";
            File.WriteAllBytes(temp, bytes);
            File.Copy(temp, path, true);
            File.Delete(temp);
        }
        return changed;
    }

    private static string ReadString(byte[] bytes, long offset)
    {
        int end = (int)offset;
        while (bytes[end] != 0) end++;
        return Encoding.ASCII.GetString(bytes, (int)offset, end - (int)offset);
    }
}
